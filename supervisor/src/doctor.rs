//! Host checks for a low-latency cluster (`understudy doctor`): each check reports what it
//! found and, when something is wrong, what to do about it. Besides the host's latency
//! settings, doctor checks that the user running it can create and own the cluster directory
//! ([`check_cluster_dir`]): the check a service user needs before its first `up`.
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
use understudy_control::control::{Control, SLOTS};

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
        check_cluster_dir(config, shm_dir),
        check_trust(config, shm_dir),
        check_leftovers(shm_dir, fix),
    ]
}

/// The name of [`check_cluster_dir`]'s result.
pub const CLUSTER_DIR_CHECK: &str = "cluster directory of this user";

/// Whether the running user can create and own the cluster directory, as `up` will: the
/// config's cluster directory, if it exists, must be this user's and private
/// ([`shm_layout::trust::check_private_dir`]); otherwise a probe directory
/// (`<shm_dir>/.doctor-probe-<pid>`, a name no cluster can have) is created under `shm_dir`
/// exactly as `up` creates a cluster directory ([`shm_layout::trust::ensure_private_dir`]),
/// then removed, with every directory above it that the probe created. A directory whose
/// owner or mode keeps this user out is reported with its owner, its mode and the running
/// user, and the fix says what to set.
pub fn check_cluster_dir(config: Option<&ClusterConfig>, shm_dir: &Path) -> Check {
    use shm_layout::trust::{check_private_dir, ensure_private_dir, euid, user_label};
    let user = user_label(euid());
    let fail = |e: shm_layout::trust::TrustError| {
        let fix = match e.unusable_dir() {
            Some(dir) => crate::config::shm_dir_advice(dir),
            None => "remove the path named (after checking what is in it), or set `shm_dir` \
                     in the config to a directory this user may create"
                .into(),
        };
        Check::new(CLUSTER_DIR_CHECK, Verdict::Fail, e.to_string(), Some(fix))
    };
    if let Some(dir) = config.map(ClusterConfig::cluster_dir) {
        if let Ok(meta) = std::fs::symlink_metadata(&dir) {
            use std::os::unix::fs::MetadataExt;
            return match check_private_dir(&dir) {
                Ok(()) => Check::new(
                    CLUSTER_DIR_CHECK,
                    Verdict::Ok,
                    format!(
                        "{} exists and is {user}'s alone (mode {:04o})",
                        dir.display(),
                        meta.mode() & 0o7777
                    ),
                    None,
                ),
                Err(e) => fail(e),
            };
        }
    }
    // The directories the probe will create: shm_dir and the missing ones above it.
    let probe = shm_dir.join(format!(".doctor-probe-{}", std::process::id()));
    let missing: Vec<PathBuf> = probe
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .map(Path::to_path_buf)
        .collect();
    let created = ensure_private_dir(&probe);
    // Deepest first; remove_dir leaves alone a directory someone else filled meanwhile.
    for dir in &missing {
        let _ = std::fs::remove_dir(dir);
    }
    match created {
        Ok(_) => Check::new(
            CLUSTER_DIR_CHECK,
            Verdict::Ok,
            format!(
                "{user} can create and own a cluster directory in {} (a probe was created \
                 private and removed)",
                shm_dir.display()
            ),
            None,
        ),
        Err(e) => fail(e),
    }
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
                "nobody but root and this user can change {}, and the cluster directories this \
                 user can see in it are this user's alone (owner, mode, no links)",
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
        let supervisor = control.supervisor().is_alive();
        let engines = (0..SLOTS).any(|s| control.registered(s).is_some_and(|id| id.is_alive()));
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
        if let Err(e) = std::fs::read_dir(shm_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Check::new(
                    name,
                    Verdict::Warn,
                    format!("cannot list {}: {e}", shm_dir.display()),
                    Some("run doctor as the user that runs the cluster".into()),
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A scratch directory removed on drop, even when the test fails.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700));
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("doctor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        Scratch(dir)
    }

    fn config(shm_dir: &Path) -> ClusterConfig {
        let mut c = ClusterConfig::new("probe", "/bin/true");
        c.shm_dir = shm_dir.to_owned();
        c
    }

    #[test]
    fn a_usable_shm_dir_passes_and_the_probe_leaves_nothing_behind() {
        // Proves the check passes where the user can create its cluster directory, and that
        // the probe and every directory it had to create are gone afterwards (an existing
        // shm_dir stays).
        let t = scratch("usable");
        let shm = t.0.join("shm/nested");
        let check = check_cluster_dir(Some(&config(&shm)), &shm);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
        assert!(check.found.contains("can create and own"), "{check:?}");
        assert!(
            !t.0.join("shm").exists(),
            "the probe left its parents behind"
        );
        std::fs::create_dir_all(&shm).unwrap();
        let check = check_cluster_dir(None, &shm);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
        assert!(shm.exists(), "an existing shm_dir was removed");
        assert_eq!(std::fs::read_dir(&shm).unwrap().count(), 0, "probe left");
        // An existing cluster directory of this user, private: ok, named.
        std::fs::create_dir_all(shm.join("probe")).unwrap();
        std::fs::set_permissions(shm.join("probe"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let check = check_cluster_dir(Some(&config(&shm)), &shm);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
        assert!(check.found.contains("exists") && check.found.contains("0700"));
    }

    #[test]
    fn a_shm_dir_others_could_write_fails_naming_its_mode() {
        // Proves a shm_dir writable by others (not sticky) fails the check, naming its mode,
        // its owner and the running user.
        let t = scratch("mode");
        let shm = t.0.join("shm");
        std::fs::create_dir_all(&shm).unwrap();
        std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o777)).unwrap();
        let check = check_cluster_dir(None, &shm);
        assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
        let me = shm_layout::trust::user_label(shm_layout::trust::euid());
        assert!(
            check.found.contains("0777") && check.found.contains(&me),
            "{check:?}"
        );
        assert!(check.fix.unwrap().contains("shm_dir = "));
    }

    #[test]
    fn a_shm_dir_that_keeps_this_user_out_fails_naming_owner_mode_and_what_to_set() {
        // Proves the setup of issue 15 (a shm_dir this user cannot create in) fails the check
        // with the directory, its owner, its mode, the running user and the shm_dir to set;
        // and a cluster directory of another user fails too. As root, the directories are
        // given to uid 65534; as another user, a directory without write permission (which
        // root would not be refused) plays the part.
        let t = scratch("owner");
        let shm = t.0.join("shm");
        std::fs::create_dir_all(&shm).unwrap();
        let me = shm_layout::trust::euid();
        let (owner, mode) = if me == 0 {
            std::os::unix::fs::chown(&shm, Some(65534), Some(65534)).unwrap();
            std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o700)).unwrap();
            (65534, "0700")
        } else {
            std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o500)).unwrap();
            (me, "0500")
        };
        let check = check_cluster_dir(Some(&config(&shm)), &shm);
        assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
        for part in [
            shm.display().to_string(),
            format!("uid {owner}"),
            mode.to_string(),
            shm_layout::trust::user_label(me),
        ] {
            assert!(check.found.contains(&part), "{part:?} missing: {check:?}");
        }
        let fix = check.fix.clone().unwrap();
        let default = crate::config::default_shm_dir_for(me);
        assert!(
            fix.contains(&format!("shm_dir = \"{}\"", default.display())),
            "{fix}"
        );
        assert!(!shm
            .join(format!(".doctor-probe-{}", std::process::id()))
            .exists());
        if me == 0 {
            // A cluster directory of another user below a directory of ours.
            std::os::unix::fs::chown(&shm, Some(0), Some(0)).unwrap();
            let dir = shm.join("probe");
            std::fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            let check = check_cluster_dir(Some(&config(&shm)), &shm);
            assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
            assert!(
                check.found.contains(&dir.display().to_string())
                    && check.found.contains("uid 65534"),
                "{check:?}"
            );
        } else {
            eprintln!("part skipped: needs root to give a cluster directory to another user");
        }
    }
}
