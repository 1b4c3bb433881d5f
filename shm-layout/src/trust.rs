//! The trust boundary on the files and directories understudy opens.
//!
//! Everything in a cluster directory decides something: which executable a supervisor runs,
//! which process holds a role, where an engine writes. A file is believed only if nobody but
//! the running user could have written it:
//!
//! - a directory understudy creates or uses ([`ensure_private_dir`], [`check_private_dir`]) is
//!   owned by the running user, is not a symbolic link and is not writable by group or others;
//!   every ancestor above it is owned by root or the running user, and is writable by group or
//!   others only if it is sticky (like `/dev/shm` and `/tmp`), so nobody else can rename or
//!   replace what lies below it;
//! - a file read for a decision ([`open_private_file`]) is opened with `O_NOFOLLOW`, then
//!   checked through its descriptor (no race with a rename): a regular file, owned by the
//!   running user, with no permission bits for group or others (mode 0600).
//!
//! Every refusal is a [`TrustError`] naming the path, what was expected and what was found.
//!
//! # Examples
//!
//! ```
//! use shm_layout::trust::{ensure_private_dir, open_private_file, TrustError};
//! use std::os::unix::fs::OpenOptionsExt;
//!
//! let dir = std::env::temp_dir().join(format!("trust-doc-{}", std::process::id()));
//! let _ = std::fs::remove_dir_all(&dir);
//! assert!(ensure_private_dir(&dir).unwrap(), "created");
//! assert!(!ensure_private_dir(&dir).unwrap(), "already there and private");
//!
//! let file = dir.join("state.json");
//! std::fs::OpenOptions::new().write(true).create(true).mode(0o644).open(&file).unwrap();
//! let refused = open_private_file(&file, libc::O_RDONLY).unwrap_err();
//! assert!(matches!(refused, TrustError::Mode { .. }), "{refused}");
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Permission bits that let group or others write.
const GROUP_OTHER_WRITE: u32 = 0o022;
/// Permission bits that give group or others any access.
const GROUP_OTHER_ANY: u32 = 0o077;

/// Why a directory or file is not trusted.
#[derive(Debug)]
pub enum TrustError {
    /// A system call failed.
    Io {
        /// The path.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The path is a symbolic link where a directory or file of our own was expected.
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// The path is not of the expected kind.
    Kind {
        /// The path.
        path: PathBuf,
        /// `a directory`, `a regular file`.
        expected: &'static str,
    },
    /// The path belongs to someone else.
    Owner {
        /// The path.
        path: PathBuf,
        /// Who may own it (`uid 0`, `uid 1000 or root`).
        expected: String,
        /// Its owner.
        found_uid: u32,
        /// Its permission bits.
        found_mode: u32,
        /// The effective uid of the process that refused it.
        caller_uid: u32,
    },
    /// The path's permission bits let someone else in.
    Mode {
        /// The path.
        path: PathBuf,
        /// What the mode must be.
        expected: &'static str,
        /// Its permission bits.
        found_mode: u32,
        /// Its owner.
        found_uid: u32,
        /// The effective uid of the process that refused it.
        caller_uid: u32,
    },
    /// The running user may not create or look up `path`: the directory holding it belongs to
    /// someone else and its mode keeps this user out (a `/dev/shm/understudy` created 0700 by
    /// root, then used by a service user).
    Access {
        /// What could not be created or looked up.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The directory that refused it (the parent of `path`).
        denied_by: PathBuf,
        /// Its owner.
        owner_uid: u32,
        /// Its permission bits.
        mode: u32,
        /// The effective uid of the process refused.
        caller_uid: u32,
        /// The error (`Permission denied`).
        source: io::Error,
    },
}

impl TrustError {
    /// The path refused.
    pub fn path(&self) -> &Path {
        match self {
            TrustError::Io { path, .. }
            | TrustError::Symlink { path }
            | TrustError::Kind { path, .. }
            | TrustError::Owner { path, .. }
            | TrustError::Mode { path, .. }
            | TrustError::Access { path, .. } => path,
        }
    }

    /// The directory whose owner or mode keeps the running user out, when that is the
    /// problem: the path refused for [`TrustError::Owner`] and [`TrustError::Mode`], the
    /// parent for [`TrustError::Access`].
    pub fn unusable_dir(&self) -> Option<&Path> {
        match self {
            TrustError::Owner { path, .. } | TrustError::Mode { path, .. } => Some(path),
            TrustError::Access { denied_by, .. } => Some(denied_by),
            _ => None,
        }
    }
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Io { path, op, source } => {
                write!(f, "{}: {op} failed: {source}", path.display())
            }
            TrustError::Symlink { path } => write!(
                f,
                "{}: expected a directory or file of this user, found a symbolic link \
                 (not followed); remove it",
                path.display()
            ),
            TrustError::Kind { path, expected } => write!(
                f,
                "{}: expected {expected}, found something else; remove it",
                path.display()
            ),
            TrustError::Owner {
                path,
                expected,
                found_uid,
                found_mode,
                caller_uid,
            } => write!(
                f,
                "{}: owner: expected {expected}, found {} (mode {found_mode:04o}) while this \
                 process runs as {}; someone else created it and could change what is in it: \
                 remove it (or choose another shm_dir) and start again",
                path.display(),
                user_label(*found_uid),
                user_label(*caller_uid),
            ),
            TrustError::Mode {
                path,
                expected,
                found_mode,
                found_uid,
                caller_uid,
            } => write!(
                f,
                "{}: mode: expected {expected}, found {found_mode:04o} (owner {}, this process \
                 runs as {}); someone else could change what is in it: remove it (or `chmod \
                 go-rwx` it if you made it) and start again",
                path.display(),
                user_label(*found_uid),
                user_label(*caller_uid),
            ),
            TrustError::Access {
                path,
                op,
                denied_by,
                owner_uid,
                mode,
                caller_uid,
                source,
            } => write!(
                f,
                "{}: {op} failed: {source}: {} belongs to {} with mode {mode:04o}, and this \
                 process runs as {}, who may not create or look up anything in it",
                path.display(),
                denied_by.display(),
                user_label(*owner_uid),
                user_label(*caller_uid),
            ),
        }
    }
}

impl std::error::Error for TrustError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TrustError::Io { source, .. } | TrustError::Access { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<TrustError> for io::Error {
    fn from(e: TrustError) -> io::Error {
        let kind = match &e {
            TrustError::Io { source, .. } | TrustError::Access { source, .. } => source.kind(),
            _ => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `uid 1000 (alice)`, or `uid 1000` when the user database has no name for it (a container's
/// arbitrary uid).
pub fn user_label(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// The name the user database gives `uid`, if any.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain old data; an all-zero value is a valid (empty) one.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `pwd` and `result` are locals, `buf`
        // is writable for `buf.len()` bytes; getpwuid_r writes the strings into `buf`.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`, alive
        // until `buf` is dropped below.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

fn io_error<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> TrustError + 'a {
    move |source| refused(path, op, source)
}

/// The error of `op` on `path`: [`TrustError::Access`] naming the parent's owner and mode when
/// it is a permission error and the parent can be looked at, [`TrustError::Io`] otherwise.
fn refused(path: &Path, op: &'static str, source: io::Error) -> TrustError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(meta) = std::fs::metadata(parent) {
                return TrustError::Access {
                    path: path.to_owned(),
                    op,
                    denied_by: parent.to_owned(),
                    owner_uid: meta.uid(),
                    mode: meta.mode() & 0o7777,
                    caller_uid: euid(),
                    source,
                };
            }
        }
    }
    TrustError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Checks an ancestor of a private directory: it resolves to a directory owned by root or us,
/// writable by group or others only if sticky; if it is a symbolic link, the link itself is
/// owned by root or us (so nobody else can point it elsewhere).
fn check_ancestor(path: &Path, uid: u32) -> Result<(), TrustError> {
    let link = std::fs::symlink_metadata(path).map_err(io_error(path, "lstat"))?;
    let owner_ok = |owner: u32| owner == 0 || owner == uid;
    let expected_owner = || {
        if uid == 0 {
            "uid 0".to_string()
        } else {
            format!("uid {uid} or root")
        }
    };
    if link.file_type().is_symlink() && !owner_ok(link.uid()) {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            expected: expected_owner(),
            found_uid: link.uid(),
            found_mode: link.mode() & 0o7777,
            caller_uid: uid,
        });
    }
    let meta = std::fs::metadata(path).map_err(io_error(path, "stat"))?;
    if !meta.is_dir() {
        return Err(TrustError::Kind {
            path: path.to_owned(),
            expected: "a directory",
        });
    }
    if !owner_ok(meta.uid()) {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            expected: expected_owner(),
            found_uid: meta.uid(),
            found_mode: meta.mode() & 0o7777,
            caller_uid: uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 && mode & libc::S_ISVTX == 0 {
        return Err(TrustError::Mode {
            path: path.to_owned(),
            expected: "no write permission for group or others, or the sticky bit (like /dev/shm)",
            found_mode: mode,
            found_uid: meta.uid(),
            caller_uid: uid,
        });
    }
    Ok(())
}

/// Checks a directory of our own: not a symbolic link, a directory, owned by `uid`, not
/// writable by group or others.
fn check_own_dir(path: &Path, uid: u32) -> Result<(), TrustError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_error(path, "lstat"))?;
    if meta.file_type().is_symlink() {
        return Err(TrustError::Symlink {
            path: path.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(TrustError::Kind {
            path: path.to_owned(),
            expected: "a directory",
        });
    }
    if meta.uid() != uid {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            expected: format!("uid {uid} (the user running understudy)"),
            found_uid: meta.uid(),
            found_mode: meta.mode() & 0o7777,
            caller_uid: uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 {
        return Err(TrustError::Mode {
            path: path.to_owned(),
            expected: "0700 (no write permission for group or others)",
            found_mode: mode,
            found_uid: meta.uid(),
            caller_uid: uid,
        });
    }
    Ok(())
}

/// The absolute, lexically normalised form of `dir` (no `.`; `..` is refused, since it would
/// make the checked chain of directories differ from the one the kernel walks).
fn normalised(dir: &Path) -> Result<PathBuf, TrustError> {
    let absolute = std::path::absolute(dir).map_err(io_error(dir, "make absolute"))?;
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                return Err(TrustError::Kind {
                    path: dir.to_owned(),
                    expected: "a path without `..`",
                })
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// Creates `dir` and its missing parents with mode 0700, or verifies the existing ones.
///
/// The directories this call creates, and `dir` itself, must end up owned by the running user,
/// not symbolic links, and not writable by group or others; the ancestors that existed before
/// must be owned by root or the running user and be writable by others only if sticky. A
/// directory someone else made (say `mkdir -m 0777` before the operator's first start) is
/// refused, never adopted. Returns whether `dir` itself was created by this call.
pub fn ensure_private_dir(dir: &Path) -> Result<bool, TrustError> {
    let uid = euid();
    let dir = normalised(dir)?;
    let mut path = PathBuf::new();
    let mut created_dir = false;
    // Walk down from the root: each component is created if missing (0700, never through a
    // link: mkdir does not follow a final symbolic link) and checked before the next one is
    // looked up inside it.
    let components: Vec<_> = dir.components().collect();
    for (i, component) in components.iter().enumerate() {
        path.push(component.as_os_str());
        let last = i + 1 == components.len();
        let created = match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            // A read-only or unwritable ancestor (`/`, `/dev`) that exists is fine.
            Err(_) if std::fs::symlink_metadata(&path).is_ok() => false,
            Err(e) => return Err(io_error(&path, "create directory")(e)),
        };
        if last {
            created_dir = created;
            check_own_dir(&path, uid)?;
        } else if created {
            check_own_dir(&path, uid)?;
        } else {
            check_ancestor(&path, uid)?;
        }
    }
    Ok(created_dir)
}

/// Verifies, without creating anything, that `dir` is a private directory as
/// [`ensure_private_dir`] would leave it, and its ancestors safe.
pub fn check_private_dir(dir: &Path) -> Result<(), TrustError> {
    let uid = euid();
    let dir = normalised(dir)?;
    let mut path = PathBuf::new();
    let components: Vec<_> = dir.components().collect();
    for (i, component) in components.iter().enumerate() {
        path.push(component.as_os_str());
        if i + 1 == components.len() {
            check_own_dir(&path, uid)?;
        } else {
            check_ancestor(&path, uid)?;
        }
    }
    Ok(())
}

/// Verifies a directory that may be shared, like the one holding every cluster's directory
/// when it is `/dev/shm` itself: it and its ancestors are owned by root or the running user
/// and writable by group or others only if sticky (nobody else can then rename or replace
/// what the running user puts in it).
pub fn check_shared_dir(dir: &Path) -> Result<(), TrustError> {
    let uid = euid();
    let dir = normalised(dir)?;
    let mut path = PathBuf::new();
    for component in dir.components() {
        path.push(component.as_os_str());
        check_ancestor(&path, uid)?;
    }
    Ok(())
}

/// Checks an open file: a regular file owned by the running user with no permission bits for
/// group or others.
pub fn check_private_file(path: &Path, file: &File) -> Result<(), TrustError> {
    let meta = file.metadata().map_err(io_error(path, "fstat"))?;
    if !meta.is_file() {
        return Err(TrustError::Kind {
            path: path.to_owned(),
            expected: "a regular file",
        });
    }
    let uid = euid();
    if meta.uid() != uid {
        return Err(TrustError::Owner {
            path: path.to_owned(),
            expected: format!("uid {uid} (the user running understudy)"),
            found_uid: meta.uid(),
            found_mode: meta.mode() & 0o7777,
            caller_uid: uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_ANY != 0 {
        return Err(TrustError::Mode {
            path: path.to_owned(),
            expected: "0600 (no permission for group or others)",
            found_mode: mode,
            found_uid: meta.uid(),
            caller_uid: uid,
        });
    }
    Ok(())
}

/// Opens `path` with `flags` (`O_RDONLY`, `O_RDWR`) plus `O_NOFOLLOW | O_CLOEXEC`, then checks
/// it through the descriptor with [`check_private_file`]. A missing file is a
/// [`TrustError::Io`] whose source is `NotFound`; a symbolic link is [`TrustError::Symlink`].
pub fn open_private_file(path: &Path, flags: libc::c_int) -> Result<File, TrustError> {
    let access = flags & libc::O_ACCMODE;
    let file = std::fs::OpenOptions::new()
        .read(access == libc::O_RDONLY || access == libc::O_RDWR)
        .write(access == libc::O_WRONLY || access == libc::O_RDWR)
        .custom_flags((flags & !libc::O_ACCMODE) | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                TrustError::Symlink {
                    path: path.to_owned(),
                }
            } else {
                refused(path, "open", source)
            }
        })?;
    check_private_file(path, &file)?;
    Ok(file)
}

/// Reads the whole of a private file ([`open_private_file`]), at most `bytes_max` bytes;
/// `Ok(None)` if it does not exist.
pub fn read_private_file(path: &Path, bytes_max: u64) -> Result<Option<Vec<u8>>, TrustError> {
    use std::io::Read;
    let file = match open_private_file(path, libc::O_RDONLY) {
        Ok(f) => f,
        Err(TrustError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(bytes_max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error(path, "read"))?;
    if bytes.len() as u64 > bytes_max {
        return Err(TrustError::Kind {
            path: path.to_owned(),
            expected: "a file of a sane size",
        });
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("trust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    #[test]
    fn a_private_dir_is_created_0700_and_accepted_again() {
        // Proves nested directories are created 0700 and a second call accepts them.
        let t = temp("create");
        let dir = t.0.join("a/b");
        assert!(ensure_private_dir(&dir).unwrap());
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(!ensure_private_dir(&dir).unwrap());
        check_private_dir(&dir).unwrap();
    }

    #[test]
    fn a_group_or_world_writable_dir_is_refused() {
        // Proves a directory made writable by others (the pre-created 0777 attack) is refused
        // both as the target and as a non-sticky ancestor.
        let t = temp("mode");
        let dir = t.0.join("shm/cluster");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&dir).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::Mode {
                    found_mode: 0o777,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("0777"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(t.0.join("shm"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&dir).unwrap_err();
        assert!(matches!(e, TrustError::Mode { .. }), "{e}");
        std::fs::set_permissions(t.0.join("shm"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_private_dir(&dir).unwrap();
    }

    #[test]
    fn a_sticky_shared_dir_is_a_safe_parent_but_not_a_private_dir() {
        // Proves /dev/shm-like directories (sticky, world-writable) are accepted as parents
        // and as a shared directory, never as a private one.
        let t = temp("sticky");
        let shared = t.0.join("shm");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_shared_dir(&shared).unwrap();
        assert!(matches!(
            check_private_dir(&shared),
            Err(TrustError::Mode { .. })
        ));
        assert!(ensure_private_dir(&shared.join("cluster")).unwrap());
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check_shared_dir(&shared),
            Err(TrustError::Mode { .. })
        ));
    }

    #[test]
    fn a_symlink_for_the_dir_or_a_file_is_refused() {
        // Proves a symbolic link in place of the private directory or of a state file is
        // refused, and its target is left untouched.
        let t = temp("link");
        let target = t.0.join("elsewhere");
        std::fs::create_dir_all(&target).unwrap();
        let link = t.0.join("cluster");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err();
        assert!(matches!(e, TrustError::Symlink { .. }), "{e}");
        let file = target.join("state");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let flink = t.0.join("state-link");
        std::os::unix::fs::symlink(&file, &flink).unwrap();
        let e = open_private_file(&flink, libc::O_RDONLY).unwrap_err();
        assert!(matches!(e, TrustError::Symlink { .. }), "{e}");
        assert_eq!(read_private_file(&file, 10).unwrap(), Some(b"x".to_vec()));
        assert_eq!(read_private_file(&t.0.join("none"), 10).unwrap(), None);
    }

    #[test]
    fn a_permission_error_names_the_directory_its_owner_and_mode_and_the_caller() {
        // Proves a refused mkdir or lookup (EACCES: the service user below root's 0700
        // directory) names the directory that refused, its owner and mode, and the caller.
        let t = temp("access");
        std::fs::create_dir_all(&t.0).unwrap();
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o710)).unwrap();
        let source = io::Error::from_raw_os_error(libc::EACCES);
        let e = refused(&t.0.join("cluster"), "create directory", source);
        let TrustError::Access {
            denied_by,
            owner_uid,
            mode,
            caller_uid,
            ..
        } = &e
        else {
            panic!("expected TrustError::Access, found {e:?}");
        };
        assert_eq!((denied_by, *owner_uid), (&t.0, euid()));
        assert_eq!((*mode, *caller_uid), (0o710, euid()));
        assert_eq!(e.unusable_dir(), Some(t.0.as_path()));
        let text = e.to_string();
        for part in ["create directory failed", "mode 0710", &user_label(euid())] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        // Anything else stays an I/O error.
        let e = refused(
            &t.0.join("x"),
            "open",
            io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(matches!(e, TrustError::Io { .. }), "{e}");
        // The name depends on the host's user database (a sandbox may have none).
        assert!(user_label(0).starts_with("uid 0"), "{}", user_label(0));
        assert_eq!(user_label(4_000_000_000), "uid 4000000000");
    }

    #[test]
    fn files_and_dirs_of_another_owner_are_refused() {
        // Proves another owner's directory or file is refused (needs root to chown; skipped
        // with a message otherwise).
        if euid() != 0 {
            eprintln!("skipped: needs root to give a file to another user");
            return;
        }
        let t = temp("owner");
        let dir = t.0.join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let file = t.0.join("state");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        let e = ensure_private_dir(&dir).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::Owner {
                    found_uid: 65534,
                    ..
                }
            ),
            "{e}"
        );
        let e = open_private_file(&file, libc::O_RDONLY).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::Owner {
                    found_uid: 65534,
                    ..
                }
            ),
            "{e}"
        );
        // Below a directory of another user, even our own directory is not safe.
        let inner = dir.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        let e = ensure_private_dir(&inner).unwrap_err();
        assert!(matches!(e, TrustError::Owner { .. }), "{e}");
    }
}
