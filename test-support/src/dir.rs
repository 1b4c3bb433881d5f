//! A private scratch directory removed on drop.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where cluster directories and rings live: shared memory.
pub const SHM_ROOT: &str = "/dev/shm";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique name for this process: `understudy-<prefix>-<pid>-<n>-<tag>`. Every harness names
/// its files this way, so that a leftover names the run that left it.
pub fn unique_name(prefix: &str, tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("understudy-{prefix}-{}-{n}-{tag}", std::process::id())
}

/// A directory of its own, created 0700 (refused if something is in the way after a leftover
/// of a crashed run with a reused pid was removed), and removed with everything in it on drop,
/// also when the test panics: unwinding runs the drop.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    keep_on_panic: bool,
    keep: bool,
}

impl TestDir {
    /// `/dev/shm/understudy-test-<pid>-<n>-<tag>/`.
    pub fn new(tag: &str) -> TestDir {
        TestDir::under(Path::new(SHM_ROOT), "test", tag)
    }

    /// `<root>/understudy-<prefix>-<pid>-<n>-<tag>/`.
    pub fn under(root: &Path, prefix: &str, tag: &str) -> TestDir {
        TestDir::at(root.join(unique_name(prefix, tag)))
    }

    /// A directory in the temporary directory (`$TMPDIR`, else /tmp), for files that are not
    /// shared memory: configs, logs, scripts.
    pub fn temp(prefix: &str, tag: &str) -> TestDir {
        TestDir::under(&std::env::temp_dir(), prefix, tag)
    }

    /// Exactly `path`, emptied first if a crashed run left it behind.
    pub fn at(path: PathBuf) -> TestDir {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        TestDir {
            path,
            keep_on_panic: false,
            keep: false,
        }
    }

    /// `/dev/shm/understudy-test-<pid>-<n>-<tag>/` reserved but not created: for an engine or a
    /// control block that creates its directory itself (with its own permission checks).
    pub fn named(tag: &str) -> TestDir {
        TestDir::reserve(Path::new(SHM_ROOT).join(unique_name("test", tag)))
    }

    /// A name reserved for this test but not created (for code under test that must create
    /// the directory itself); removed on drop all the same.
    pub fn reserve(path: PathBuf) -> TestDir {
        let _ = std::fs::remove_dir_all(&path);
        TestDir {
            path,
            keep_on_panic: false,
            keep: false,
        }
    }

    /// Keep the directory when the test fails (printing where), for logs worth reading.
    pub fn keep_on_panic(mut self) -> TestDir {
        self.keep_on_panic = true;
        self
    }

    /// Never remove the directory (an operator asked to keep a run's files).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.keep || (self.keep_on_panic && std::thread::panicking()) {
            eprintln!("test files kept in {}", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A file (not a directory) removed on drop: a ring or lock file a test maps by itself.
#[derive(Debug)]
pub struct TestFile(pub PathBuf);

impl TestFile {
    /// `/dev/shm/understudy-test-<pid>-<n>-<tag>`, removed first if a crashed run left it.
    pub fn new(tag: &str) -> TestFile {
        let path = Path::new(SHM_ROOT).join(unique_name("test", tag));
        let _ = std::fs::remove_file(&path);
        TestFile(path)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
