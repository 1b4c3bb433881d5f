//! Clusters for tests and benchmarks (feature `cluster`): engines started directly on one
//! cluster directory ([`Engines`]), a cluster under `understudy up` ([`Supervised`]), and a
//! planned switchover through the control block ([`switchover`]).
//!
//! Both harnesses kill every process they started and remove every file they made when they
//! drop, also when the test fails; every process they start dies with the test runner.

mod engines;
mod supervised;

pub use engines::Engines;
pub use supervised::{strip_ansi, testapp, Reaper, Supervised, CLUSTER_MARK_VAR};

use std::time::Duration;

use understudy_runtime::control::{cmd, Control, Field, Role, State, SLOTS};

use crate::wait::Wait;

/// Makes a test's own cluster type (a [`Supervised`] field plus the test's config and waits)
/// deref to its [`Supervised`], so the harness's methods are the type's.
#[macro_export]
macro_rules! derefs_to_supervised {
    ($wrapper:ty, $field:tt) => {
        impl ::std::ops::Deref for $wrapper {
            type Target = $crate::cluster::Supervised;
            fn deref(&self) -> &Self::Target {
                &self.$field
            }
        }
        impl ::std::ops::DerefMut for $wrapper {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.$field
            }
        }
    };
}

/// How long a test waits for what should take milliseconds (a role change, an
/// acknowledgement): generous, for a debug build on two loaded CPUs.
pub const LONG: Duration = Duration::from_secs(20);

/// The role the control block shows for `slot`.
pub fn role(c: &Control, slot: usize) -> Role {
    Role::from_word(c.get(slot, Field::Role))
}

/// The state the control block shows for `slot`.
pub fn state(c: &Control, slot: usize) -> State {
    State::from_word(c.get(slot, Field::State))
}

/// Every slot's record, one line each (for failure messages).
pub fn dump(c: &Control) -> String {
    let mut s = format!("epoch {}, active slot {:?}\n", c.epoch(), c.active_slot());
    for slot in 0..SLOTS {
        s += &format!(
            "  slot {slot}: pid {} v{} {} {} commits {} digest {:#x} gen {} layout {} features {} step-ups {} error {}\n",
            c.get(slot, Field::Pid),
            c.get(slot, Field::AppVersion),
            role(c, slot).name(),
            state(c, slot).name(),
            c.get(slot, Field::Commits),
            c.get(slot, Field::Digest),
            c.get(slot, Field::AttachGen),
            c.get(slot, Field::Layout),
            c.get(slot, Field::Features),
            c.get(slot, Field::StepUps),
            c.get(slot, Field::Error),
        );
    }
    s
}

/// [`crate::wait_until`] that shows the cluster's control block when it times out.
pub fn wait_cluster(c: &Control, what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    Wait::new(what, timeout).context(|| dump(c)).until(f)
}

/// Planned switchovers through the control block, as the supervisor posts them.
pub mod switchover {
    use super::*;

    /// Posts a planned switchover to `to` and waits (up to [`LONG`]) for its
    /// acknowledgement; returns the result code (0: done). A target that already says it is
    /// hot is waited for by the active until the target's acknowledgement reaches it: no
    /// retry is needed here.
    pub fn post(c: &Control, to: usize, what: &str) -> u64 {
        let seq = c.post(cmd::SWITCHOVER, to as u64);
        Wait::new(&format!("{what}: acked"), LONG)
            .context(|| dump(c))
            .until(|| {
                let (acked, result) = c.acked();
                if acked == seq {
                    Ok(result)
                } else {
                    Err(format!("acknowledged command {acked}, posted {seq}"))
                }
            })
    }

    /// A switchover to `to` that must succeed: acknowledged with result 0, and `to` active.
    pub fn to(c: &Control, to: usize) {
        let result = post(c, to, &format!("switchover to slot {to}"));
        assert_eq!(result, 0, "switchover to {to} refused\n{}", dump(c));
        wait_cluster(c, &format!("slot {to} active"), LONG, || {
            role(c, to) == Role::Active
        });
    }
}
