//! systemd notifications (`Type=notify` units), through the `sd-notify` crate.
//!
//! When `NOTIFY_SOCKET` is set, a small thread of `understudy up`:
//! - sends `READY=1` once the cluster has an active engine and a hot standby (a unit that
//!   depends on ours starts only when a failover would lose nothing);
//! - sends a `STATUS=` line whenever the roles change (`active a (epoch 3), hot standby b`);
//! - when the unit sets `WatchdogSec=` (systemd passes `WATCHDOG_USEC`, and `WATCHDOG_PID`
//!   naming us), sends `WATCHDOG=1` every half period, **only while** the supervisor's loop
//!   advances (it calls [`loop_tick`] every iteration) **and** an engine's heartbeat
//!   advances: a supervisor stuck in its loop, or a cluster where no engine lives any more,
//!   stops the pings and systemd restarts the supervisor (with `KillMode=process` the
//!   engines keep running and the new supervisor re-adopts them);
//! - sends `STOPPING=1` when the supervisor leaves.
//!
//! The role words come from the control block the supervisor already maps; the thread reads,
//! never writes, and every word read is checked (a damaged word is no role).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{info, warn};
use understudy_control::control::{slot_name, Control, Field, Role, State, SLOTS};

/// How often the systemd thread looks at the cluster (status, readiness, the watchdog).
const WATCH_EVERY: Duration = Duration::from_millis(50);

static LOOP_TICKS: AtomicU64 = AtomicU64::new(0);

/// Called by the supervisor's loop on every iteration: the watchdog's proof of life.
pub fn loop_tick() {
    LOOP_TICKS.fetch_add(1, Ordering::Relaxed);
}

/// The watchdog period systemd asks for: `WATCHDOG_USEC`, if `WATCHDOG_PID` is unset or
/// names this process (as `sd_watchdog_enabled(3)` reads them).
fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// What the roles look like now: (active and hot standby present, the STATUS text).
fn observe(control: &Control) -> (bool, String) {
    let alive = |s: usize| control.registered(s).is_some_and(|id| id.is_alive());
    let active = match (control.epoch_checked(), control.active_slot_checked()) {
        (Ok(epoch), Ok(Some(a)))
            if a < SLOTS
                && alive(a)
                && Role::from_word(control.get(a, Field::Role)) == Role::Active =>
        {
            Some((a, epoch))
        }
        _ => None,
    };
    let hot: Vec<usize> = (0..SLOTS)
        .filter(|&s| Some(s) != active.map(|a| a.0))
        .filter(|&s| {
            alive(s)
                && Role::from_word(control.get(s, Field::Role)) == Role::Standby
                && State::from_word(control.get(s, Field::State)) == State::Hot
        })
        .collect();
    let standbys = if hot.is_empty() {
        "no hot standby".to_owned()
    } else {
        let names: Vec<String> = hot.iter().map(|&s| slot_name(s).to_string()).collect();
        format!("hot standby {}", names.join(", "))
    };
    match active {
        Some((a, epoch)) => (
            !hot.is_empty(),
            format!("active {} (epoch {epoch}), {standbys}", slot_name(a)),
        ),
        None => (false, format!("no active engine, {standbys}")),
    }
}

/// The sum of every slot's heartbeat word: changes while any engine beats.
fn heartbeats(control: &Control) -> u64 {
    (0..SLOTS).fold(0u64, |a, s| {
        a.wrapping_add(control.get(s, Field::HeartbeatNs))
    })
}

fn send(states: &[NotifyState]) {
    // Never unset the variable: other threads may read the environment meanwhile.
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("systemd notification failed: {e}");
    }
}

/// The notification thread; sends `STOPPING=1` and stops on drop.
pub struct Notifier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Start notifying if `NOTIFY_SOCKET` is set (else `None`: not under systemd).
    pub fn start(control: Control) -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = watchdog_period();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("systemd-notify".into())
            .spawn(move || run(control, watchdog, &flag))
            .map_err(|e| warn!("cannot start the systemd notification thread: {e}"))
            .ok()?;
        info!(
            watchdog_ms = watchdog.map_or(0, |w| w.as_millis() as u64),
            "systemd notifications on"
        );
        Some(Notifier {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        send(&[NotifyState::Stopping]);
    }
}

fn run(control: Control, watchdog: Option<Duration>, stop: &AtomicBool) {
    let mut ready = false;
    let mut status = String::new();
    let ping_every = watchdog.map(|w| w / 2);
    let mut last_ping = Instant::now();
    let mut ticks_seen = LOOP_TICKS.load(Ordering::Relaxed);
    let mut beats_seen = heartbeats(&control);
    let mut withheld_reported = false;
    while !stop.load(Ordering::Relaxed) {
        let (serving, now_status) = observe(&control);
        if now_status != status {
            status = now_status;
            send(&[NotifyState::Status(&status)]);
        }
        if serving && !ready {
            ready = true;
            send(&[NotifyState::Ready]);
            info!("systemd: ready ({status})");
        }
        if let Some(every) = ping_every {
            if last_ping.elapsed() >= every {
                let ticks = LOOP_TICKS.load(Ordering::Relaxed);
                let beats = heartbeats(&control);
                let looping = ticks != ticks_seen;
                let beating = beats != beats_seen;
                if looping && beating {
                    send(&[NotifyState::Watchdog]);
                    last_ping = Instant::now();
                    ticks_seen = ticks;
                    beats_seen = beats;
                    withheld_reported = false;
                } else if !withheld_reported {
                    withheld_reported = true;
                    warn!(
                        supervisor_loop_advances = looping,
                        engine_heartbeats_advance = beating,
                        "withholding the systemd watchdog ping"
                    );
                }
            }
        }
        std::thread::sleep(WATCH_EVERY);
    }
}
