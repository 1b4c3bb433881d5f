//! `Region::create` and `Region::open` against real files under /dev/shm: every validation
//! error of `open`, each provoked by creating a real region and then corrupting the file with
//! plain file writes, and the refusals of `create`.

mod common;

use common::TestDir;
use shm_layout::region::{
    file_bytes, IdentityWords, Region, RegionError, RegionSpec, HEADER_BYTES, LAYOUT_MAJOR, MAGIC,
    READY,
};
use shm_layout::ring::{CONTROL_BYTES, MIN_CAPACITY};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

const CAPACITY: usize = 4096;
/// Long enough for a published region, short enough that NotReady tests stay quick.
const WAIT: Duration = Duration::from_millis(50);

// Superblock word indices, as documented in `shm_layout::region`.
const W_MAGIC: u64 = 0;
const W_VERSION: u64 = 1;
const W_SIZES: u64 = 2;
const W_CAPACITY: u64 = 3;
const W_UID_KIND: u64 = 7;
const W_READY: u64 = 12;

fn spec() -> RegionSpec {
    RegionSpec {
        capacity: CAPACITY,
        epoch: 42,
        kind: 7,
    }
}

fn producer() -> IdentityWords {
    IdentityWords {
        pid: 4242,
        start_time: 987_654,
    }
}

/// A fresh, valid region file at `dir/name`; the mapping is dropped so that only the file is
/// left to corrupt.
fn make_region(dir: &TestDir, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let region = Region::create(&path, spec(), producer()).expect("create a valid region");
    drop(region);
    path
}

fn read_word(path: &Path, word: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, word * 8).unwrap();
    u64::from_le_bytes(b)
}

/// Overwrite superblock word `word` with a plain write(2), as a stray writer would.
fn write_word(path: &Path, word: u64, value: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), word * 8).unwrap();
    assert_eq!(read_word(path, word), value, "the corruption landed");
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn open_err(path: &Path) -> RegionError {
    match Region::open(path, WAIT) {
        Ok(_) => panic!("{} opened, but it is corrupt", path.display()),
        Err(e) => e,
    }
}

/// The message an operator reads must carry each of `parts`.
fn assert_says(err: &RegionError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} does not say {p:?}");
    }
}

fn assert_field(err: &RegionError, field: &str, expected: &str, found: &str) {
    match err {
        RegionError::Field {
            field: f,
            expected: e,
            found: x,
            ..
        } => {
            assert_eq!(*f, field, "field named in {err:?}");
            assert_eq!(e, expected, "expected value in {err:?}");
            assert_eq!(x, found, "found value in {err:?}");
        }
        other => panic!("expected a Field({field}) error, got {other:?}"),
    }
    assert_says(
        err,
        &[
            &format!("field `{field}`"),
            &format!("expected {expected}"),
            &format!("found {found}"),
        ],
    );
}

fn hex(v: u64) -> String {
    format!("{v:#018x}")
}

#[test]
fn open_sees_what_create_published() {
    // Proves a published region opens and shows the id, epoch, capacity, kind and producer
    // identity its creator wrote, and that two regions get different ids.
    let dir = TestDir::new("happy");
    let path = dir.join("ring");
    let created = Region::create(&path, spec(), producer()).unwrap();
    let opened = Region::open(&path, WAIT).unwrap();
    assert_eq!(opened.region_id(), created.region_id());
    assert_ne!(opened.region_id(), 0);
    assert_eq!(opened.epoch(), 42);
    assert_eq!(opened.capacity(), CAPACITY);
    assert_eq!(opened.kind(), 7);
    assert_eq!(opened.layout_version().0, LAYOUT_MAJOR);
    assert_eq!(opened.producer_identity(), Some(producer()));
    assert_eq!(opened.consumer_identity(), None);
    assert_eq!(opened.closed(), None);

    // Both mappings are the same memory: a write through one is seen through the other.
    let consumer = IdentityWords {
        pid: 77,
        start_time: 5,
    };
    opened.set_consumer_identity(consumer);
    assert_eq!(created.consumer_identity(), Some(consumer));
    created.close(9);
    assert_eq!(opened.closed(), Some(9));

    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.len(), file_bytes(CAPACITY) as u64);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);

    let other = Region::create(&dir.join("other"), spec(), producer()).unwrap();
    assert_ne!(other.region_id(), created.region_id());
}

#[test]
fn wrong_magic_is_refused() {
    // Proves a file whose magic word is not `USTDYRG1` is refused, naming the magic field with
    // both values.
    let dir = TestDir::new("magic");
    let path = make_region(&dir, "ring");
    let bad = u64::from_le_bytes(*b"NOTARING");
    write_word(&path, W_MAGIC, bad);
    let err = open_err(&path);
    assert_field(&err, "magic", &hex(MAGIC), &hex(bad));
}

#[test]
fn wrong_magic_while_not_ready_is_reported_as_magic() {
    // Proves a file that is not a region at all (garbage magic, READY never set) is reported as
    // a bad magic after the wait, not as a region still being initialised.
    let dir = TestDir::new("magic-unready");
    let path = make_region(&dir, "ring");
    let bad = 0x1234_5678_9abc_def0;
    write_word(&path, W_MAGIC, bad);
    write_word(&path, W_READY, 0);
    let err = open_err(&path);
    assert_field(&err, "magic", &hex(MAGIC), &hex(bad));
}

#[test]
fn unknown_major_version_is_refused() {
    // Proves a layout major version other than ours is refused with both versions named.
    let dir = TestDir::new("major");
    let path = make_region(&dir, "ring");
    let v = read_word(&path, W_VERSION);
    let other = LAYOUT_MAJOR + 1;
    write_word(&path, W_VERSION, (v & !0xFFFF) | other as u64);
    let err = open_err(&path);
    assert_field(
        &err,
        "layout major version",
        &LAYOUT_MAJOR.to_string(),
        &other.to_string(),
    );
}

#[test]
fn a_region_of_the_previous_major_is_refused_naming_both_versions() {
    // Proves a region written by a major-3 producer (every frame stores its sequence number
    // in word 3, before major 4 stopped doing so inside a batch) is refused, the error naming
    // 4 expected and 3 found, rather than read with the newer frame rules.
    assert_eq!(
        LAYOUT_MAJOR, 4,
        "update this test when the major changes again"
    );
    let dir = TestDir::new("major3");
    let path = make_region(&dir, "ring");
    let v = read_word(&path, W_VERSION);
    write_word(&path, W_VERSION, (v & !0xFFFF) | 3);
    let err = open_err(&path);
    assert_field(&err, "layout major version", "4", "3");
    let text = err.to_string();
    assert!(text.contains('4') && text.contains('3'), "{text}");
}

#[test]
fn newer_minor_version_is_accepted() {
    // Proves a minor version bump (additions an older reader may ignore) still opens.
    let dir = TestDir::new("minor");
    let path = make_region(&dir, "ring");
    let v = read_word(&path, W_VERSION);
    write_word(&path, W_VERSION, (v & !0xFFFF_0000) | 9 << 16);
    let r = Region::open(&path, WAIT).expect("a newer minor version opens");
    assert_eq!(r.layout_version(), (LAYOUT_MAJOR, 9));
}

#[test]
fn wrong_record_alignment_is_refused() {
    // Proves a region written with another frame alignment is refused, naming the field.
    let dir = TestDir::new("align");
    let path = make_region(&dir, "ring");
    let v = read_word(&path, W_VERSION);
    write_word(&path, W_VERSION, (v & 0xFFFF_FFFF) | 64 << 32);
    let err = open_err(&path);
    assert_field(&err, "record alignment", "32", "64");
}

#[test]
fn wrong_header_and_control_sizes_are_refused() {
    // Proves the superblock's header-bytes and control-bytes fields are checked, each by name.
    let dir = TestDir::new("sizes");
    let path = make_region(&dir, "ring");
    let sizes = read_word(&path, W_SIZES);
    write_word(&path, W_SIZES, (sizes & !0xFFFF_FFFF) | 8192);
    assert_field(
        &open_err(&path),
        "header bytes",
        &HEADER_BYTES.to_string(),
        "8192",
    );
    write_word(&path, W_SIZES, (sizes & 0xFFFF_FFFF) | 256 << 32);
    assert_field(
        &open_err(&path),
        "control bytes",
        &CONTROL_BYTES.to_string(),
        "256",
    );
}

#[test]
fn capacity_not_a_power_of_two_is_refused() {
    // Proves capacities that are not a power of two in range are refused by name and value,
    // before the file size is trusted.
    let dir = TestDir::new("cap");
    let path = make_region(&dir, "ring");
    let expected = format!("a power of two between {MIN_CAPACITY} and 2^30");
    for bad in [3000u64, 0, 512, 1 << 31, u64::MAX] {
        write_word(&path, W_CAPACITY, bad);
        assert_field(&open_err(&path), "capacity", &expected, &bad.to_string());
    }
}

#[test]
fn capacity_not_matching_file_size_is_refused() {
    // Proves a superblock capacity that disagrees with the file's size is refused as a file size
    // error naming both sizes (larger capacity: the file is "truncated"; smaller: too long).
    let dir = TestDir::new("cap-size");
    let path = make_region(&dir, "ring");
    write_word(&path, W_CAPACITY, 2 * CAPACITY as u64);
    let err = open_err(&path);
    match err {
        RegionError::FileSize {
            expected, found, ..
        } => {
            assert_eq!(expected, file_bytes(2 * CAPACITY) as u64);
            assert_eq!(found, file_bytes(CAPACITY) as u64);
        }
        ref other => panic!("expected FileSize, got {other:?}"),
    }
    assert_says(
        &err,
        &[
            "field `file size`",
            &format!("expected {} bytes", file_bytes(2 * CAPACITY)),
            &format!("found {}", file_bytes(CAPACITY)),
            "truncated",
        ],
    );

    write_word(&path, W_CAPACITY, CAPACITY as u64 / 2);
    let err = open_err(&path);
    assert!(
        matches!(err, RegionError::FileSize { expected, found, .. }
            if expected == file_bytes(CAPACITY / 2) as u64 && found == file_bytes(CAPACITY) as u64),
        "{err:?}"
    );
    assert!(!err.to_string().contains("truncated"), "{err}");
}

#[test]
fn file_shorter_than_the_superblock_says_is_refused() {
    // Proves a region file cut short (but still longer than the smallest region) is refused
    // with the expected and found sizes.
    let dir = TestDir::new("short");
    let path = make_region(&dir, "ring");
    let short = file_bytes(CAPACITY) as u64 - 1024;
    set_len(&path, short);
    let err = open_err(&path);
    assert!(
        matches!(err, RegionError::FileSize { expected, found, .. }
            if expected == file_bytes(CAPACITY) as u64 && found == short),
        "{err:?}"
    );
    assert_says(
        &err,
        &[
            "field `file size`",
            &format!("expected {} bytes", file_bytes(CAPACITY)),
            &format!("found {short}"),
            "truncated",
        ],
    );

    // And one that grew: the superblock's capacity no longer describes it.
    let long = file_bytes(CAPACITY) as u64 + 4096;
    set_len(&path, long);
    let err = open_err(&path);
    assert!(
        matches!(err, RegionError::FileSize { expected, found, .. }
            if expected == file_bytes(CAPACITY) as u64 && found == long),
        "{err:?}"
    );
}

#[test]
fn file_shorter_than_the_minimum_is_refused() {
    // Proves a file too short to hold even the smallest region (including an empty one) is
    // refused before anything is mapped, naming the minimum and the size found.
    let dir = TestDir::new("tiny");
    let path = make_region(&dir, "ring");
    let min = file_bytes(MIN_CAPACITY) as u64;
    for len in [min - 8, 100, 0] {
        set_len(&path, len);
        let err = open_err(&path);
        assert!(
            matches!(err, RegionError::FileSize { expected, found, .. }
                if expected == min && found == len),
            "{err:?}"
        );
        assert_says(
            &err,
            &[
                "field `file size`",
                &format!("expected {min} bytes"),
                &format!("found {len}"),
            ],
        );
    }
}

#[test]
fn region_still_being_initialised_is_not_ready_after_the_wait() {
    // Proves an opener waits (bounded) for READY and then reports NotReady, having waited at
    // least the time it was given and not much longer.
    let dir = TestDir::new("unready");
    let path = make_region(&dir, "ring");
    write_word(&path, W_READY, 0);
    let started = Instant::now();
    let err = open_err(&path);
    let took = started.elapsed();
    match err {
        RegionError::NotReady { waited, .. } => assert!(waited >= WAIT, "waited {waited:?}"),
        ref other => panic!("expected NotReady, got {other:?}"),
    }
    assert!(took >= WAIT, "returned after {took:?}, before the wait");
    assert_says(
        &err,
        &["field `ready`", "expected", "found", "being initialised"],
    );
}

#[test]
fn region_published_during_the_wait_opens() {
    // Proves the wait is real: a superblock published while the opener waits is accepted.
    let dir = TestDir::new("late");
    let path = make_region(&dir, "ring");
    write_word(&path, W_READY, 0);
    let publisher = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            write_word(&path, W_READY, READY);
        })
    };
    let r = Region::open(&path, Duration::from_secs(10));
    publisher.join().unwrap();
    let r = r.expect("opens once READY is stored");
    assert_eq!(r.epoch(), 42);
}

#[test]
fn garbage_ready_word_is_refused() {
    // Proves a READY word that is neither 0 nor READY is reported as such after the wait.
    let dir = TestDir::new("ready-garbage");
    let path = make_region(&dir, "ring");
    write_word(&path, W_READY, 0xdead);
    assert_field(&open_err(&path), "ready", &hex(READY), &hex(0xdead));
}

#[test]
fn wrong_creator_uid_in_superblock_is_refused() {
    // Proves the creator uid recorded in the superblock must be ours.
    let dir = TestDir::new("creator");
    let path = make_region(&dir, "ring");
    let w = read_word(&path, W_UID_KIND);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let other = uid.wrapping_add(1000);
    write_word(&path, W_UID_KIND, (w & !0xFFFF_FFFF) | other as u64);
    assert_field(
        &open_err(&path),
        "creator uid",
        &uid.to_string(),
        &other.to_string(),
    );
}

#[test]
fn symlink_is_refused() {
    // Proves a region is never opened through a symbolic link, even one to a valid region.
    let dir = TestDir::new("symlink");
    let path = make_region(&dir, "ring");
    let link = dir.join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = open_err(&link);
    assert!(
        matches!(&err, RegionError::Symlink { path } if path == &link),
        "{err:?}"
    );
    assert_says(&err, &["expected a regular file", "found a symbolic link"]);
}

#[test]
fn insecure_mode_is_refused() {
    // Proves a region readable by group or others is refused with the mode found.
    let dir = TestDir::new("mode");
    let path = make_region(&dir, "ring");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = open_err(&path);
    assert!(
        matches!(
            err,
            RegionError::InsecureMode {
                found_mode: 0o644,
                ..
            }
        ),
        "{err:?}"
    );
    assert_says(&err, &["field `mode`", "expected 0600", "found 0644"]);
}

#[test]
fn file_of_another_user_is_refused() {
    // Proves a region owned by another user is refused, naming both uids. Needs root to give
    // the file away; skipped otherwise.
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        eprintln!("file_of_another_user_is_refused: SKIPPED (needs root to chown, euid {uid})");
        return;
    }
    let dir = TestDir::new("owner");
    let path = make_region(&dir, "ring");
    std::os::unix::fs::chown(&path, Some(1), None).unwrap();
    let err = open_err(&path);
    assert!(
        matches!(
            err,
            RegionError::WrongOwner {
                expected_uid: 0,
                found_uid: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_says(&err, &["field `owner`", "expected uid 0", "found uid 1"]);
}

#[test]
fn fifo_is_not_a_file() {
    // Proves something that opens but is not a regular file (a FIFO) is refused as NotAFile.
    let dir = TestDir::new("fifo");
    let path = dir.join("fifo");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = open_err(&path);
    assert!(matches!(err, RegionError::NotAFile { .. }), "{err:?}");
    assert_says(&err, &["expected a regular file"]);
}

#[test]
fn missing_file_is_an_io_error() {
    // Proves opening a path that does not exist reports the operation and the OS error.
    let dir = TestDir::new("missing");
    let err = open_err(&dir.join("nothing"));
    match &err {
        RegionError::Io { op, source, .. } => {
            assert_eq!(*op, "open");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn create_twice_fails_and_leaves_the_first_intact() {
    // Proves create never reuses an existing file (O_EXCL): the second create fails and the
    // first region's superblock is untouched.
    let dir = TestDir::new("twice");
    let path = dir.join("ring");
    let first = Region::create(&path, spec(), producer()).unwrap();
    let again = Region::create(
        &path,
        RegionSpec {
            capacity: 2 * CAPACITY,
            epoch: 1,
            kind: 1,
        },
        IdentityWords::default(),
    );
    match again {
        Err(RegionError::Io { op, source, .. }) => {
            assert_eq!(op, "create");
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        Err(other) => panic!("expected Io(AlreadyExists), got {other:?}"),
        Ok(_) => panic!("created a region over an existing one"),
    }
    let opened = Region::open(&path, WAIT).unwrap();
    assert_eq!(opened.region_id(), first.region_id());
    assert_eq!(opened.epoch(), 42);
    assert_eq!(opened.capacity(), CAPACITY);
}

#[test]
fn create_through_a_dangling_symlink_is_refused() {
    // Proves create does not follow a symlink planted at its path: it fails, reports the link,
    // and the link's target is never created.
    let dir = TestDir::new("dangling");
    let target = dir.join("target");
    let link = dir.join("ring");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = match Region::create(&link, spec(), producer()) {
        Ok(_) => panic!("created a region through a symlink"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, RegionError::Symlink { path } if path == &link),
        "{err:?}"
    );
    assert_says(&err, &["found a symbolic link"]);
    assert!(!target.exists(), "the symlink's target was created");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn create_refuses_a_bad_capacity() {
    // Proves create validates the capacity before touching the file system.
    let dir = TestDir::new("create-cap");
    let path = dir.join("ring");
    for bad in [0usize, 1000, 512, 3 << 10] {
        let err = match Region::create(
            &path,
            RegionSpec {
                capacity: bad,
                ..spec()
            },
            producer(),
        ) {
            Ok(_) => panic!("created a region of capacity {bad}"),
            Err(e) => e,
        };
        assert_field(
            &err,
            "capacity",
            &format!("a power of two between {MIN_CAPACITY} and 2^30"),
            &bad.to_string(),
        );
        assert!(!path.exists());
    }
}
