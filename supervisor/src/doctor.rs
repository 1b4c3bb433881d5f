//! Host checks for a low-latency cluster (`understudy doctor`): each check reports what it
//! found and, when something is wrong, what to do about it.
//!
//! # Examples
//!
//! ```
//! use understudy_supervisor::doctor::{parse_cpu_list, Verdict};
//!
//! assert_eq!(parse_cpu_list("2-4,7\n"), Some(vec![2, 3, 4, 7]));
//! assert_eq!(parse_cpu_list(""), Some(vec![]));
//! assert!(Verdict::Fail > Verdict::Warn);
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use understudy_runtime::control::{Control, Field, SLOTS};
use understudy_runtime::liveness::ProcessIdentity;

use crate::config::ClusterConfig;

/// How a check went, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but costs latency.
    Warn,
    /// Needs fixing.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// How it went.
    pub verdict: Verdict,
    /// What was found.
    pub found: String,
    /// What to do, when not ok.
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &str, verdict: Verdict, found: String, fix: Option<String>) -> Check {
        Check {
            name: name.into(),
            verdict,
            found,
            fix,
        }
    }
}

/// Parses a kernel CPU list (`0-3,8,10-11`); `None` if malformed.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Runs every check. `config` gives the pinned CPUs and the shared-memory directory (the
/// defaults without one); with `fix`, leftover files of dead clusters are removed.
///
/// Doctor checks only what the product uses: pinned CPUs (`[slots.x] cpu`, applied with
/// `sched_setaffinity` when an engine starts) should be isolated. It does not check the
/// memlock limit or huge pages: understudy locks no memory and maps its rings and control
/// block with ordinary pages, so advice about them would be advice about nothing.
pub fn run(config: Option<&ClusterConfig>, shm_dir: &Path, fix: bool) -> Vec<Check> {
    vec![
        check_isolation(config),
        check_clocksource(),
        check_trust(config, shm_dir),
        check_leftovers(shm_dir, fix),
    ]
}

/// The state files of a cluster directory that decide something, each checked as
/// [`shm_layout::trust::open_private_file`] would.
const STATE_FILES: [&str; 3] = [
    "control",
    crate::process::SPAWNED_FILE,
    crate::record::RECORD_FILE,
];

/// Every problem found with the trust of `shm_dir`, the cluster directories under it (and the
/// config's, wherever it is) and their state files.
pub fn trust_problems(config: Option<&ClusterConfig>, shm_dir: &Path) -> Vec<String> {
    use shm_layout::trust::{check_private_dir, check_shared_dir, open_private_file, TrustError};
    let mut problems = Vec::new();
    let mut dirs = Vec::new();
    if std::fs::symlink_metadata(shm_dir).is_ok() {
        // The shm directory may be shared (`/dev/shm` itself); a cluster directory in it, one
        // holding a control file, must be private.
        if let Err(e) = check_shared_dir(shm_dir) {
            problems.push(e.to_string());
        } else if let Ok(entries) = std::fs::read_dir(shm_dir) {
            dirs.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|d| std::fs::symlink_metadata(d.join("control")).is_ok()),
            );
        }
    }
    if let Some(c) = config {
        let dir = c.cluster_dir();
        if !dirs.contains(&dir) && std::fs::symlink_metadata(&dir).is_ok() {
            dirs.push(dir);
        }
    }
    dirs.sort();
    for dir in dirs {
        if let Err(e) = check_private_dir(&dir) {
            problems.push(e.to_string());
            continue;
        }
        for name in STATE_FILES {
            match open_private_file(&dir.join(name), libc::O_RDONLY) {
                Ok(_) => {}
                Err(TrustError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    problems
}

fn check_trust(config: Option<&ClusterConfig>, shm_dir: &Path) -> Check {
    let name = "private cluster directories";
    let problems = trust_problems(config, shm_dir);
    if problems.is_empty() {
        return Check::new(
            name,
            Verdict::Ok,
            format!(
                "{} and its clusters are this user's alone (owner, mode, no links)",
                shm_dir.display()
            ),
            None,
        );
    }
    Check::new(
        name,
        Verdict::Fail,
        problems.join("; "),
        Some(
            "someone else could change what the supervisor reads or runs: stop the cluster, \
             remove the directory or file named (after checking what is in it), and start \
             again; `understudy up` refuses to use it meanwhile"
                .into(),
        ),
    )
}

fn check_isolation(config: Option<&ClusterConfig>) -> Check {
    let name = "CPU isolation of pinned cores";
    let pinned: Vec<u32> = config
        .map(|c| {
            [&c.slots.a, &c.slots.b, &c.slots.c]
                .into_iter()
                .filter_map(|s| s.as_ref().and_then(|s| s.cpu))
                .collect()
        })
        .unwrap_or_default();
    if pinned.is_empty() {
        return Check::new(
            name,
            Verdict::Warn,
            "no slot is pinned to a CPU".into(),
            Some("pin each slot to an isolated core: `[slots.a] cpu = 2` in the config".into()),
        );
    }
    let isolated = std::fs::read_to_string("/sys/devices/system/cpu/isolated")
        .ok()
        .and_then(|t| parse_cpu_list(&t))
        .unwrap_or_default();
    let missing: Vec<u32> = pinned
        .iter()
        .copied()
        .filter(|c| !isolated.contains(c))
        .collect();
    if missing.is_empty() {
        Check::new(
            name,
            Verdict::Ok,
            format!("pinned CPUs {pinned:?} are isolated"),
            None,
        )
    } else {
        Check::new(
            name,
            Verdict::Fail,
            format!("pinned CPUs {missing:?} are not isolated (isolated: {isolated:?})"),
            Some(format!(
                "boot with `isolcpus={0} nohz_full={0} rcu_nocbs={0}` on the kernel command line",
                missing
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        )
    }
}

fn check_clocksource() -> Check {
    let name = "clock source";
    match std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    {
        Ok(s) if s.trim() == "tsc" => Check::new(name, Verdict::Ok, "tsc".into(), None),
        Ok(s) => Check::new(
            name,
            Verdict::Warn,
            format!("{}: clock reads are slower than with tsc", s.trim()),
            Some("use the TSC if the CPU has an invariant one: boot with `clocksource=tsc tsc=reliable`".into()),
        ),
        Err(e) => Check::new(name, Verdict::Warn, format!("cannot read: {e}"), None),
    }
}

/// The cluster directories under `shm_dir` whose engines and supervisor are all dead.
pub fn dead_clusters(shm_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(shm_dir) else {
        return Vec::new();
    };
    let mut dead = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("control").exists() {
            continue;
        }
        let Ok(control) = Control::open(&dir) else {
            // Unreadable or corrupt: not ours to judge.
            continue;
        };
        let alive = |pid: u64, start: u64| {
            pid != 0
                && pid <= u64::from(u32::MAX)
                && ProcessIdentity {
                    pid: pid as u32,
                    start_time_ticks: start,
                }
                .is_alive()
        };
        let supervisor = alive(
            control
                .supervisor_word(0)
                .load(std::sync::atomic::Ordering::Acquire),
            control
                .supervisor_word(1)
                .load(std::sync::atomic::Ordering::Acquire),
        );
        let engines =
            (0..SLOTS).any(|s| alive(control.get(s, Field::Pid), control.get(s, Field::StartTime)));
        if !supervisor && !engines {
            dead.push(dir);
        }
    }
    dead.sort();
    dead
}

fn check_leftovers(shm_dir: &Path, fix: bool) -> Check {
    let name = "leftover shared files";
    let dead = dead_clusters(shm_dir);
    if dead.is_empty() {
        return Check::new(
            name,
            Verdict::Ok,
            format!("no dead cluster under {}", shm_dir.display()),
            None,
        );
    }
    let list = dead
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if fix {
        let failed: Vec<String> = dead
            .iter()
            .filter_map(|d| {
                std::fs::remove_dir_all(d)
                    .err()
                    .map(|e| format!("{}: {e}", d.display()))
            })
            .collect();
        if failed.is_empty() {
            return Check::new(name, Verdict::Ok, format!("removed {list}"), None);
        }
        return Check::new(
            name,
            Verdict::Fail,
            format!("could not remove {}", failed.join("; ")),
            Some("remove them by hand".into()),
        );
    }
    Check::new(
        name,
        Verdict::Fail,
        format!("clusters whose engines are all dead: {list}"),
        Some("run `understudy doctor --fix` to remove them".into()),
    )
}
