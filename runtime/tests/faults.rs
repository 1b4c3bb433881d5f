//! Faults on the replication path, with real engine processes: corrupted frames in the ring, a
//! standby that stops consuming, catch-up of a large state under load, a standby killed while
//! it catches up, and a standby that starts before any active exists.
mod common;
use common::*;
use shm_layout::frame::COMMIT_LEN_MASK;
use shm_layout::region::Region;
use shm_layout::{AtomicU64, Ordering};
use std::path::Path;
use std::time::Duration;
use understudy_runtime::control::{Control, Field, Role, State};

#[test]
#[ignore]
fn child_engine() {
    child_main();
}

const T: Duration = Duration::from_secs(20);

/// Start a version-1 engine of the self-driving workload in `slot`. No test here is about
/// hung-active detection, so its threshold is raised far above the default 200 ms: on a loaded
/// host a descheduled active must not be fenced by its standby in the middle of a test.
fn spawn(cl: &mut Cluster, slot: usize, standby_only: bool, extra: &[(&'static str, String)]) {
    let mut env = vec![("US_HUNG_MS", "10000".to_string())];
    env.extend_from_slice(extra);
    cl.spawn("child_engine", slot, 1, u64::MAX, standby_only, &env);
}
/// The close reason a standby writes into a stream it rejected (engine.rs `CLOSE_CORRUPT`).
const CLOSE_CORRUPT: u64 = 2;
/// The close reason of a standby untethered for a full stream (engine.rs `CLOSE_UNTETHERED`).
const CLOSE_UNTETHERED: u64 = 1;
/// The close reason of a standby the active refused (engine.rs `CLOSE_REFUSED`).
const CLOSE_REFUSED: u64 = 3;

/// A raw, writable view of a stream region's ring: what a stray write (or a bit flip) sees.
/// Layout (shm-layout): the region's 4096-byte superblock, then the ring's control lines
/// (line 0: producer head position, line 1: consumer tail position, 128 bytes each, four
/// lines in all), then the data area.
struct RawRing {
    map: memmap2::MmapRaw,
    capacity: u64,
}

impl RawRing {
    fn open(path: &Path, capacity: usize) -> RawRing {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let map = memmap2::MmapOptions::new().map_raw(&f).unwrap();
        assert_eq!(
            map.len(),
            shm_layout::region::file_bytes(capacity),
            "stream file size"
        );
        RawRing {
            map,
            capacity: capacity as u64,
        }
    }

    fn ring_word(&self, byte: u64) -> &AtomicU64 {
        let off = shm_layout::region::HEADER_BYTES + byte as usize;
        assert!(off % 8 == 0 && off + 8 <= self.map.len());
        // SAFETY: in bounds and 8-byte aligned in a mapping that lives as long as `self`;
        // every process touches these words only through atomics.
        unsafe { &*(self.map.as_mut_ptr().add(off) as *const AtomicU64) }
    }

    fn head(&self) -> u64 {
        self.ring_word(0).load(Ordering::Acquire)
    }

    fn tail(&self) -> u64 {
        self.ring_word(128).load(Ordering::Acquire)
    }

    /// The data word at ring position `pos`.
    fn data(&self, pos: u64) -> &AtomicU64 {
        self.ring_word(shm_layout::ring::CONTROL_BYTES as u64 + (pos & (self.capacity - 1)))
    }
}

/// Facts about the active that must not change while a standby has trouble.
struct ActiveFacts {
    slot: usize,
    pid: u64,
    epoch: u64,
    step_ups: u64,
}

impl ActiveFacts {
    fn of(c: &Control, slot: usize) -> ActiveFacts {
        assert_eq!(role(c, slot), Role::Active);
        ActiveFacts {
            slot,
            pid: c.get(slot, Field::Pid),
            epoch: c.epoch(),
            step_ups: c.get(slot, Field::StepUps),
        }
    }

    /// Same process, same epoch, never stepped up again, still active and committing.
    fn assert_unaffected(&self, cl: &mut Cluster, c: &Control, what: &str) {
        let s = self.slot;
        assert!(cl.running(s), "{what}: the active process exited");
        assert_eq!(
            c.get(s, Field::Pid),
            self.pid,
            "{what}: the active restarted"
        );
        assert_eq!(c.epoch(), self.epoch, "{what}: the epoch changed");
        assert_eq!(
            c.get(s, Field::StepUps),
            self.step_ups,
            "{what}: a role change happened"
        );
        assert_eq!(role(c, s), Role::Active, "{what}: the active lost its role");
    }
}

/// Let the active's workload run `more` requests past what it started, wait until both
/// engines applied exactly those, and check both digests equal the model's.
fn finish_and_compare(
    c: &Control,
    side: &Side,
    active: usize,
    standby: usize,
    model: &mut Model,
    more: u64,
) {
    let end = extend_workload(side, more);
    wait_cluster(c, &format!("both engines at {end} transactions"), T, || {
        c.get(active, Field::Commits) == end && c.get(standby, Field::Commits) == end
    });
    let d = model.advance_to(end);
    wait_cluster(
        c,
        &format!("both digests equal the model's after {end} transactions"),
        T,
        || c.get(active, Field::Digest) == d && c.get(standby, Field::Digest) == d,
    );
}

/// The standby in `slot`'s current stream, opened: retried while the standby re-attaches
/// (after an untether or resync the stream of the generation just read is gone).
fn open_stream(cl: &Cluster, c: &Control, slot: usize) -> (u64, std::path::PathBuf, Region) {
    let mut found = None;
    wait_cluster(c, "the standby's stream opened", T, || {
        let gen = c.get(slot, Field::AttachGen);
        let path = Control::stream_path(&cl.dir, c.epoch(), slot, gen);
        match Region::open(&path, Duration::from_millis(100)) {
            Ok(r) if c.get(slot, Field::AttachGen) == gen && state(c, slot) == State::Hot => {
                found = Some((gen, path, r));
                true
            }
            _ => false,
        }
    });
    found.expect("found")
}

/// The active's committed count rises by `n` (it never blocks on a standby).
fn wait_commits_rise(c: &Control, slot: usize, n: u64, what: &str) {
    let k = c.get(slot, Field::Commits);
    wait_cluster(
        c,
        &format!("{what}: active commits past {}", k + n),
        T,
        || c.get(slot, Field::Commits) >= k + n,
    );
}

/// A flipped bit in a committed, unread frame of the stream is caught by the standby's
/// validation: it rejects the stream (closes it as corrupt), re-attaches with a new attach
/// generation and catches up to hot again, while the active never notices beyond a detach (same
/// process, same epoch, no role change, commits keep rising) and no transaction is lost: both
/// engines end with the model's state.
#[test]
fn corrupted_frame_makes_standby_resync_and_loses_nothing() {
    let mut cl = Cluster::new("corrupt");
    let c = cl.control();
    let side = cl.side(0);
    let pace = ("US_PACE_US", "100".to_string());
    // The standby is frozen while the test finds and corrupts a frame: the active must not
    // untether it first, however long the test thread is descheduled.
    let patient = ("US_BACKPRESSURE_MS", "60000".to_string());
    let env = [cl.side_env(0), pace.clone(), patient];
    spawn(&mut cl, 0, false, &env);
    wait_cluster(&c, "a active", T, || role(&c, 0) == Role::Active);
    spawn(&mut cl, 1, true, &[pace]);
    wait_cluster(&c, "b hot", T, || state(&c, 1) == State::Hot);
    let active = ActiveFacts::of(&c, 0);
    let (gen, path, region) = open_stream(&cl, &c, 1);
    let ring = RawRing::open(&path, region.capacity());

    // Freeze the standby so the frames ahead of it stay unread, then corrupt the second
    // committed batch past its released tail: the first may be half-read at the freeze, the
    // second cannot have been touched yet.
    cl.stop(1);
    let mut second = 0;
    wait_cluster(
        &c,
        "two committed batches ahead of the frozen standby",
        T,
        || {
            let tail = ring.tail();
            let first = ring.data(tail).load(Ordering::Acquire);
            if first == 0 {
                return false;
            }
            second = tail + (first & COMMIT_LEN_MASK);
            ring.head() > second && ring.data(second).load(Ordering::Acquire) != 0
        },
    );
    // The frame header's third word holds the stored checksum in its upper half.
    ring.data(second + 16).fetch_xor(1 << 40, Ordering::AcqRel);
    cl.signal(1, libc::SIGCONT);

    wait_cluster(&c, "b re-attaches with a new generation", T, || {
        c.get(1, Field::AttachGen) > gen
    });
    assert_eq!(
        region.closed(),
        Some(CLOSE_CORRUPT),
        "the rejected stream is closed as corrupt by the standby"
    );
    wait_cluster(&c, "b hot again after the resync", T, || {
        state(&c, 1) == State::Hot && role(&c, 1) == Role::Standby
    });
    assert_eq!(
        c.get(1, Field::AttachGen),
        gen + 1,
        "one corrupted frame costs exactly one resync"
    );
    wait_commits_rise(&c, 0, 100, "after the resync");
    active.assert_unaffected(&mut cl, &c, "after the corrupted frame");
    finish_and_compare(&c, &side, 0, 1, &mut Model::new(1), 200);
    active.assert_unaffected(&mut cl, &c, "at the end");
}

/// A standby that stops consuming (SIGSTOP) fills its small stream; the active waits the bounded
/// back-pressure time, untethers it (marks it stale) and keeps committing; once resumed, the
/// standby sees it was untethered, catches up and ends with the same state as the active.
#[test]
fn stopped_standby_is_untethered_and_catches_up_after_resume() {
    let mut cl = Cluster::new("backpressure");
    let c = cl.control();
    let side = cl.side(0);
    let pace = ("US_PACE_US", "20".to_string());
    let bounded = ("US_BACKPRESSURE_MS", "20".to_string());
    // Small rings (the active's too: it refuses a standby whose ring is smaller than its
    // own, which its largest transaction could not fit).
    let ring = ("US_RING", "65536".to_string());
    let env = [cl.side_env(0), pace.clone(), bounded, ring.clone()];
    spawn(&mut cl, 0, false, &env);
    wait_cluster(&c, "a active", T, || role(&c, 0) == Role::Active);
    spawn(&mut cl, 1, true, &[pace, ring]);
    wait_cluster(&c, "b hot", T, || state(&c, 1) == State::Hot);
    let active = ActiveFacts::of(&c, 0);
    let (gen, _, region) = open_stream(&cl, &c, 1);

    cl.stop(1);
    wait_cluster(&c, "the active marks the frozen standby stale", T, || {
        state(&c, 1) == State::Stale
    });
    assert_eq!(
        region.closed(),
        Some(CLOSE_UNTETHERED),
        "the full stream is closed as untethered by the active"
    );
    wait_commits_rise(&c, 0, 500, "standby frozen and untethered");
    active.assert_unaffected(&mut cl, &c, "while the standby is frozen");

    cl.signal(1, libc::SIGCONT);
    wait_cluster(&c, "b re-attaches after the resume", T, || {
        c.get(1, Field::AttachGen) > gen
    });
    wait_cluster(&c, "b hot again", T, || {
        state(&c, 1) == State::Hot && role(&c, 1) == Role::Standby
    });
    active.assert_unaffected(&mut cl, &c, "after the catch-up");
    finish_and_compare(&c, &side, 0, 1, &mut Model::new(1), 500);
}

/// Spawn an active that keeps every unit and let it commit `units` transactions (so it holds
/// that many units); its workload then waits on the side limit, which the test raises.
fn large_active(cl: &mut Cluster, units: u64, chunk: usize) -> (Control, Side) {
    large_active_with(cl, units, chunk, &[])
}

/// [`large_active`] with more environment for the active.
fn large_active_with(
    cl: &mut Cluster,
    units: u64,
    chunk: usize,
    extra: &[(&'static str, String)],
) -> (Control, Side) {
    let c = cl.control();
    let side = cl.side(0);
    side.set_limit(units);
    let mut env = vec![
        cl.side_env(0),
        ("US_KEEP", "1".to_string()),
        ("US_CHUNK", chunk.to_string()),
    ];
    env.extend_from_slice(extra);
    spawn(cl, 0, false, &env);
    wait_cluster(&c, &format!("a commits {units} transactions"), T, || {
        c.get(0, Field::Commits) == units
    });
    (c, side)
}

fn keeping_model() -> Model {
    let mut m = Model::new(1);
    m.app.keep = true;
    m
}

/// A standby attaching to an active with 60 000 units while the active keeps committing goes
/// syncing → hot, and transactions committed during its catch-up are not lost: its state ends
/// equal to the active's and the model's.
#[test]
fn catch_up_of_a_large_state_under_load() {
    const UNITS: u64 = 60_000;
    let mut cl = Cluster::new("catchup");
    let (c, side) = large_active(&mut cl, UNITS, 256);
    let active = ActiveFacts::of(&c, 0);
    spawn(&mut cl, 1, true, &[("US_KEEP", "1".to_string())]);
    // Drive the active's workload from here: ten more requests per millisecond or so.
    let mut syncing_at = None;
    wait_cluster(&c, "b hot", Duration::from_secs(40), || {
        side.set_limit(side.limit() + 10);
        std::thread::sleep(Duration::from_millis(1));
        match state(&c, 1) {
            State::Syncing if c.get(1, Field::AttachGen) > 0 => {
                syncing_at.get_or_insert(c.get(0, Field::Commits));
                false
            }
            State::Hot => true,
            _ => false,
        }
    });
    let syncing_at = syncing_at.expect("b was never seen syncing");
    assert!(
        c.get(0, Field::Commits) > syncing_at,
        "the active committed nothing while the standby was catching up"
    );
    active.assert_unaffected(&mut cl, &c, "after the catch-up");
    finish_and_compare(&c, &side, 0, 1, &mut keeping_model(), 300);
}

/// A standby SIGKILLed in the middle of its catch-up leaves the active serving (same process,
/// no role change, commits keep rising); a new standby in its slot catches up and ends with
/// the active's and the model's state.
#[test]
fn standby_killed_while_syncing_is_replaced() {
    const UNITS: u64 = 20_000;
    let mut cl = Cluster::new("killsync");
    let (c, side) = large_active(&mut cl, UNITS, 16);
    let active = ActiveFacts::of(&c, 0);
    // Freeze b mid catch-up, then kill it. A test thread descheduled for the whole catch-up
    // (hundreds of ms) finds b already hot: try again with a fresh b.
    let mut tries = 0;
    loop {
        tries += 1;
        spawn(&mut cl, 1, true, &[]);
        wait_cluster(&c, "b syncing", T, || {
            state(&c, 1) == State::Syncing && c.get(1, Field::AttachGen) > 0
        });
        cl.stop(1);
        let caught = state(&c, 1) != State::Hot;
        cl.kill(1);
        if caught {
            break;
        }
        assert!(
            tries < 5,
            "b finished its catch-up before every kill (make it slower)"
        );
    }
    let gen = c.get(1, Field::AttachGen);
    side.set_limit(UNITS + 2_000);
    wait_commits_rise(&c, 0, 1_000, "standby killed while syncing");
    active.assert_unaffected(&mut cl, &c, "after the kill");

    spawn(&mut cl, 1, true, &[]);
    wait_cluster(&c, "the new b hot", T, || {
        state(&c, 1) == State::Hot && c.get(1, Field::AttachGen) > gen
    });
    active.assert_unaffected(&mut cl, &c, "after the replacement caught up");
    finish_and_compare(&c, &side, 0, 1, &mut keeping_model(), 300);
}

/// A standby started while no active exists waits (alive, never active, epoch still 0), then
/// attaches to the active once one starts and mirrors it exactly.
#[test]
fn standby_started_before_the_active_waits_then_attaches() {
    let mut cl = Cluster::new("early");
    let c = cl.control();
    spawn(&mut cl, 1, true, &[]);
    wait_cluster(&c, "b publishes its pid", T, || c.get(1, Field::Pid) != 0);
    // It is waiting: its heartbeat moves, it is alive, and nobody claimed an epoch.
    let hb = c.get(1, Field::HeartbeatNs);
    wait_cluster(&c, "b's heartbeat moves while it waits", T, || {
        c.get(1, Field::HeartbeatNs) > hb
    });
    let hb = c.get(1, Field::HeartbeatNs);
    wait_cluster(&c, "b's heartbeat moves again", T, || {
        c.get(1, Field::HeartbeatNs) > hb
    });
    assert!(cl.running(1), "the waiting standby exited");
    assert_eq!(c.epoch(), 0, "a standby-only engine claimed an epoch");
    assert_ne!(
        role(&c, 1),
        Role::Active,
        "a standby-only engine became active"
    );

    let side = cl.side(0);
    side.set_limit(3_000);
    let env = [cl.side_env(0)];
    spawn(&mut cl, 0, false, &env);
    wait_cluster(&c, "a active", T, || role(&c, 0) == Role::Active);
    wait_cluster(&c, "b hot", T, || {
        state(&c, 1) == State::Hot && role(&c, 1) == Role::Standby
    });
    assert_eq!(c.epoch(), 1, "the active started epoch 1");
    finish_and_compare(&c, &side, 0, 1, &mut Model::new(1), 300);
}

/// "Hot" is never published on a closed stream, wherever in a catch-up the active lets the
/// standby go: for each step of the catch-up (its begin, chunks, its end, past its end), the
/// active untethers the syncing standby at that step (test hook), a watcher samples the
/// standby's state beside its stream's close word the whole time, and once the standby is
/// hot again (re-attached and caught up), a SIGKILL of the active makes it step up with the
/// model's state: the "hot" it published was true.
#[test]
fn hot_is_never_published_on_a_closed_stream_at_any_step_of_a_catch_up() {
    const UNITS: u64 = 1_000;
    // Steps: 1 = the snapshot's begin; a chunk of 64 units is one step, and each live
    // transaction (one every ms) sends a piece; the walk ends well before step 200.
    for at in [1u64, 2, 3, 5, 8, 13, 21, 34, 55, 200] {
        let mut cl = Cluster::new(&format!("untether{at}"));
        let (c, side) = large_active_with(
            &mut cl,
            UNITS,
            64,
            &[
                ("UNDERSTUDY_TEST_UNTETHER_AT_STEP", at.to_string()),
                ("US_PACE_US", "1000".to_string()),
            ],
        );
        side.set_limit(u64::MAX);
        spawn(&mut cl, 1, true, &[("US_KEEP", "1".to_string())]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (stop, dir, c) = (stop.clone(), cl.dir.clone(), cl.control());
            std::thread::spawn(move || watch_hot_against_close(&c, &dir, 1, &stop))
        };
        wait_cluster(&c, "b hot", T, || {
            state(&c, 1) == State::Hot && role(&c, 1) == Role::Standby
        });
        // Hot for a while under the live load, still on an open stream.
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = watcher.join().expect("watcher");
        assert_eq!(
            seen.violations, 0,
            "untether at step {at}: hot seen on a closed stream {} times",
            seen.violations
        );
        let (committed, started) = (side.committed(), side.started());
        cl.kill(0);
        wait_cluster(&c, "b active after the kill", T, || {
            role(&c, 1) == Role::Active && c.get(1, Field::StepUps) > 0
        });
        let end = c.get(1, Field::StepUpCommits);
        assert!(
            committed <= end && end <= started + 1,
            "untether at step {at}: b stepped up at {end} transactions; the dead active had committed at least {committed}"
        );
        assert_eq!(
            keeping_model().advance_to(end),
            c.get(1, Field::StepUpDigest),
            "untether at step {at}: b's state at its step-up is not the state after exactly {end} transactions"
        );
        let untethers: u64 = understudy_runtime::counters::read(&cl.dir)
            .map(|s| s.slots.iter().map(|k| k.untethers_total).sum())
            .unwrap_or(0);
        eprintln!(
            "untether at catch-up step {at}: {untethers} untether(s), {} untethered stream(s) seen closed by the watcher, b took over at {end} transactions",
            seen.closed_streams
        );
        // The walk of 1,000 units in chunks of 64 takes more than 13 steps: the hook fired.
        if at <= 13 {
            assert_eq!(untethers, 1, "the test hook untethered b at step {at}");
        }
    }
}

#[derive(Default)]
struct Watched {
    violations: u64,
    closed_streams: u64,
}

/// Sample `slot`'s state and its current stream's close word until `stop`: a `Hot` state that
/// stays beside a closed stream of the same attach generation (re-read after 20 ms, so the
/// instant between the active's close and its `Stale` is not counted) is a violation.
fn watch_hot_against_close(
    c: &Control,
    dir: &Path,
    slot: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Watched {
    let mut w = Watched::default();
    let mut open: Option<(u64, u64, Region)> = None;
    let mut counted: Vec<(u64, u64)> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (epoch, gen) = (c.epoch(), c.get(slot, Field::AttachGen));
        if open.as_ref().map(|(e, g, _)| (*e, *g)) != Some((epoch, gen)) {
            open = Region::open(&Control::stream_path(dir, epoch, slot, gen), Duration::ZERO)
                .ok()
                .map(|r| (epoch, gen, r));
        }
        if let Some((e, g, r)) = &open {
            if r.closed().is_some() {
                if !counted.contains(&(*e, *g)) {
                    counted.push((*e, *g));
                    w.closed_streams += 1;
                }
                if state(c, slot) == State::Hot {
                    std::thread::sleep(Duration::from_millis(20));
                    if state(c, slot) == State::Hot
                        && c.get(slot, Field::AttachGen) == *g
                        && c.epoch() == *e
                    {
                        w.violations += 1;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    w
}

/// A standby that was hot, then untethered, keeps its consistent copy while it catches up
/// again; if the active dies during that catch-up, the standby goes back to the copy (state
/// `Stale`, its transaction count and digest published: exactly the model's state after that
/// many transactions), does not step up on its own, and becomes active when the operator
/// promotes it (slot command `PROMOTE`), starting from that copy.
#[test]
fn a_consistent_copy_survives_the_active_dying_during_a_re_catch_up_and_can_be_promoted() {
    const UNITS: u64 = 20_000;
    // Four catch-ups and two freezes on a loaded 2-core host: generous bounds.
    const LONG: Duration = Duration::from_secs(60);
    let mut cl = Cluster::new("prefix");
    let (c, side) = large_active_with(
        &mut cl,
        UNITS,
        16,
        // Untethered only when frozen (a descheduled debug standby on a loaded host can
        // stall for tens of ms); paced so that its catch-ups converge on 2 loaded cores.
        &[
            ("US_BACKPRESSURE_MS", "300".to_string()),
            ("US_PACE_US", "200".to_string()),
            ("US_RING", "65536".to_string()),
        ],
    );
    side.set_limit(u64::MAX);
    spawn(
        &mut cl,
        1,
        true,
        &[
            ("US_KEEP", "1".to_string()),
            ("US_RING", "65536".to_string()),
        ],
    );
    wait_cluster(&c, "b hot", LONG, || state(&c, 1) == State::Hot);
    let mut tries = 0;
    let copy = loop {
        tries += 1;
        assert!(tries <= 5, "b was never caught in its second catch-up");
        // Untether b: freeze it until the active gives up on its full stream.
        cl.stop(1);
        wait_cluster(&c, "the active untethers the frozen b", LONG, || {
            state(&c, 1) == State::Stale
        });
        let copy = c.get(1, Field::Commits);
        let gen = c.get(1, Field::AttachGen);
        cl.signal(1, libc::SIGCONT);
        // Catch it in its second catch-up, freeze it, kill the active.
        wait_cluster(&c, "b syncing again", LONG, || {
            c.get(1, Field::AttachGen) > gen && state(&c, 1) != State::Stale
        });
        cl.stop(1);
        if state(&c, 1) == State::Syncing {
            break copy;
        }
        cl.signal(1, libc::SIGCONT);
        wait_cluster(&c, "b hot", LONG, || state(&c, 1) == State::Hot);
    };
    cl.kill(0);
    cl.signal(1, libc::SIGCONT);
    // The copy holds what b applied before its stream was closed: at least what it had
    // published when the active untethered it.
    let at_untether = copy;
    let mut copy = 0;
    wait_cluster(&c, "b back to its consistent copy", LONG, || {
        copy = c.get(1, Field::Commits);
        state(&c, 1) == State::Stale && copy >= at_untether && c.get(1, Field::Epoch) == 1
    });
    // Published together with its digest; give the digest word a moment to follow.
    std::thread::sleep(Duration::from_millis(50));
    let copy = c.get(1, Field::Commits);
    let mut m = keeping_model();
    let d = m.advance_to(copy);
    wait_cluster(&c, "b's published digest is the copy's", LONG, || {
        c.get(1, Field::Digest) == d
    });
    // It does not step up on its own.
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(role(&c, 1), Role::Active, "b stepped up with a stale copy");
    // The operator promotes it.
    c.set(
        1,
        Field::Cmd,
        understudy_runtime::control::slot_cmd::PROMOTE,
    );
    wait_cluster(&c, "b active after the promote", LONG, || {
        role(&c, 1) == Role::Active && c.get(1, Field::StepUps) > 0
    });
    assert_eq!(
        c.get(1, Field::StepUpCommits),
        copy,
        "b took over from its copy"
    );
    assert_eq!(c.get(1, Field::StepUpDigest), d, "with the copy's state");
}

/// An active refuses a standby whose stream ring is smaller than its own (its largest
/// transaction would not fit: the standby would be untethered by it, later and silently): the
/// stream is closed as refused with a message naming both sizes, and the standby exits.
#[test]
fn a_standby_with_a_smaller_ring_than_the_active_is_refused() {
    let mut cl = Cluster::new("smallring");
    let c = cl.control();
    let side = cl.side(0);
    side.set_limit(100);
    let env = [cl.side_env(0), ("US_RING", "1048576".to_string())];
    spawn(&mut cl, 0, false, &env);
    wait_cluster(&c, "a active", T, || role(&c, 0) == Role::Active);
    spawn(&mut cl, 1, true, &[("US_RING", "65536".to_string())]);
    wait_cluster(&c, "b announces a stream", T, || {
        c.get(1, Field::AttachGen) > 0
    });
    let path = Control::stream_path(&cl.dir, c.epoch(), 1, c.get(1, Field::AttachGen));
    let region = Region::open(&path, Duration::from_secs(5)).expect("b's stream");
    wait_cluster(&c, "the active refuses b's stream", T, || {
        region.closed() == Some(CLOSE_REFUSED)
    });
    let (status, _) = cl.wait_exit(1, T);
    assert!(
        !status.success(),
        "the refused standby exits with an error: {status}"
    );
    assert_ne!(state(&c, 1), State::Hot);
}
