//! Engines started directly (no supervisor) on one cluster directory.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use understudy_runtime::control::Control;
use understudy_testkit::Side;

use crate::child::{self, ChildGuard};
use crate::dir::{unique_name, SHM_ROOT};

/// Log lines shown when an engine exited unexpectedly.
const LOG_TAIL_LINES: usize = 15;
/// How often (in polls) [`Engines::wait_running`] checks that every engine still runs.
pub const CHECK_EVERY_POLLS: u32 = 64;

/// The slot names engines take on their command line.
pub const SLOT_NAMES: [&str; 3] = ["a", "b", "c"];

/// A unique cluster directory under /dev/shm and the engines started on it, one per slot;
/// on drop every engine is killed and reaped and the directory (with the side channels) is
/// removed. Every engine dies with the test runner too (see [`ChildGuard`]).
#[derive(Debug)]
pub struct Engines {
    /// The cluster directory (created by the first engine or [`Engines::control`]).
    pub dir: PathBuf,
    children: Vec<(usize, ChildGuard)>,
    /// The log file of the engine last started in a slot with [`Engines::start_logged`].
    logs: Vec<(usize, PathBuf)>,
}

impl Engines {
    /// `/dev/shm/understudy-test-<pid>-<n>-<tag>`, emptied if a crashed run left it.
    pub fn new(tag: &str) -> Engines {
        let dir = Path::new(SHM_ROOT).join(unique_name("test", tag));
        let _ = std::fs::remove_dir_all(&dir);
        Engines {
            dir,
            children: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// The control block (created with the directory if no engine made it yet).
    pub fn control(&self) -> Control {
        Control::open_or_create(&self.dir)
            .unwrap_or_else(|e| panic!("opening the control block in {}: {e}", self.dir.display()))
    }

    /// `--dir <dir> --slot <a|b|c>` and `--standby` if `standby`: the arguments every engine
    /// executable takes.
    pub fn engine_args(&self, slot: usize, standby: bool) -> Vec<String> {
        let mut args = vec![
            "--dir".to_string(),
            self.dir.display().to_string(),
            "--slot".to_string(),
            SLOT_NAMES[slot].to_string(),
        ];
        if standby {
            args.push("--standby".to_string());
        }
        args
    }

    /// Starts `cmd` as the engine of `slot` (a previous one there is killed first).
    pub fn start(&mut self, slot: usize, cmd: &mut Command) {
        self.kill(slot);
        self.children.push((slot, ChildGuard::spawn(cmd)));
    }

    /// As [`Engines::start`], the engine's stderr written to `log`, whose tail
    /// [`Engines::check_running`] shows if the engine exits.
    pub fn start_logged(&mut self, slot: usize, cmd: &mut Command, log: PathBuf) {
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating the log {}: {e}", log.display()));
        self.start(slot, cmd.stderr(file));
        self.logs.retain(|(s, _)| *s != slot);
        self.logs.push((slot, log));
    }

    /// Panics, with the last lines of its log, if an engine exited (`hint`: what to do then).
    pub fn check_running(&mut self, hint: &str) {
        if let Some((slot, status)) = self.exited() {
            let text = self
                .logs
                .iter()
                .find(|(s, _)| *s == slot)
                .and_then(|(_, l)| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            panic!(
                "engine in slot {slot} exited ({status}); expected it to keep running. \
                 Its log:\n{}\n{hint}",
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            );
        }
    }

    /// Waits (bounded, polling every `step`) until `f(control)`; panics naming `what`, or
    /// the engine that exited meanwhile (checked every [`CHECK_EVERY_POLLS`] polls and at the
    /// timeout, to keep tight polls cheap).
    pub fn wait_running(
        &mut self,
        control: &Control,
        what: &str,
        timeout: Duration,
        step: Duration,
        hint: &str,
        mut f: impl FnMut(&Control) -> bool,
    ) {
        let start = std::time::Instant::now();
        let mut polls = 0u32;
        crate::wait::Wait::new(what, timeout).every(step).until(|| {
            polls = polls.wrapping_add(1);
            if polls % CHECK_EVERY_POLLS == 0 || start.elapsed() > timeout {
                self.check_running(hint);
            }
            f(control)
        })
    }

    fn child(&mut self, slot: usize) -> &mut ChildGuard {
        self.children
            .iter_mut()
            .find(|(s, _)| *s == slot)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no engine was started in slot {slot}"))
    }

    /// Waits (bounded) for the engine in `slot` to exit on its own: its exit status and its
    /// stderr (empty unless piped).
    pub fn wait_exit(&mut self, slot: usize, timeout: Duration) -> (ExitStatus, String) {
        let out = self
            .child(slot)
            .wait_exit(&format!("the engine in slot {slot}"), timeout);
        self.children.retain(|(s, _)| *s != slot);
        out
    }

    /// Is the engine started in `slot` still running (not exited, not killed)?
    pub fn running(&mut self, slot: usize) -> bool {
        self.children
            .iter_mut()
            .find(|(s, _)| *s == slot)
            .is_some_and(|(_, c)| c.running())
    }

    /// Every engine started is still running (none died).
    pub fn all_running(&mut self) -> bool {
        self.children.iter_mut().all(|(_, c)| c.running())
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the engine in `slot`.
    pub fn signal(&self, slot: usize, signal: libc::c_int) {
        child::send(self.started_pid(slot), signal)
    }

    /// Freezes the engine in `slot` with SIGSTOP; returns once every one of its threads is
    /// stopped (see [`child::freeze`]).
    pub fn stop(&self, slot: usize) {
        child::freeze(self.started_pid(slot), super::LONG);
    }

    fn started_pid(&self, slot: usize) -> u32 {
        self.pid(slot)
            .unwrap_or_else(|| panic!("no engine was started in slot {slot}"))
    }

    /// SIGKILLs and reaps the engine in `slot` (nothing if none runs there).
    pub fn kill(&mut self, slot: usize) {
        if let Some(i) = self.children.iter().position(|(s, _)| *s == slot) {
            self.children.remove(i).1.kill();
        }
    }

    /// Takes the engine of `slot` out of the cluster (still guarded): a test that kills it on
    /// purpose and watches it die.
    pub fn take(&mut self, slot: usize) -> ChildGuard {
        self.logs.retain(|(s, _)| *s != slot);
        let i = self
            .children
            .iter()
            .position(|(s, _)| *s == slot)
            .unwrap_or_else(|| panic!("no engine was started in slot {slot}"));
        self.children.remove(i).1
    }

    /// The first engine found exited (slot and status), if any did.
    pub fn exited(&mut self) -> Option<(usize, ExitStatus)> {
        self.children
            .iter_mut()
            .find_map(|(slot, c)| c.try_wait().map(|status| (*slot, status)))
    }

    /// The pid of the engine started in `slot`.
    pub fn pid(&self, slot: usize) -> Option<u32> {
        self.children
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, c)| c.id())
    }

    /// The side channel of the engine in `slot` (a file inside the cluster directory, so it
    /// is removed with it); pass [`Engines::side_env`] to the engine so it reports there.
    pub fn side(&self, slot: usize) -> Side {
        let _ = self.control(); // creates the directory
        Side::open(&self.side_path(slot))
    }

    /// The environment that makes an engine in `slot` report through [`Engines::side`].
    pub fn side_env(&self, slot: usize) -> (&'static str, String) {
        ("US_SIDE", self.side_path(slot).display().to_string())
    }

    /// Where the side channel of `slot` lives.
    pub fn side_path(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("side-{slot}"))
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        // Engines first, files after: none can recreate a file once it is gone.
        for (_, mut c) in self.children.drain(..) {
            c.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Side-channel files next to the directory (`<dir>.side-N`).
        if let (Some(parent), Some(name)) = (self.dir.parent(), self.dir.file_name()) {
            let prefix = format!("{}.side-", name.to_string_lossy());
            if let Ok(entries) = std::fs::read_dir(parent) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}
