//! The launch contract between the supervisor and an engine (environment variables, exit
//! codes): defined in the control crate ([`understudy_control::launch`], re-exported here), so
//! the supervisor that sets the variables never depends on the runtime. What only an engine
//! needs, the [`Options`] a launch stands for, is here.

pub use understudy_control::launch::*;

use crate::engine::Options;

/// Engine options for `launch`, with the tuning variables of the environment applied
/// ([`Options::apply_env`]).
pub fn options(launch: &Launch) -> Result<Options, LaunchError> {
    let mut opt = Options::new(launch.dir.clone(), launch.slot);
    opt.standby_only = launch.standby_only;
    if let Some(r) = launch.ring {
        opt.ring_capacity = r;
    }
    opt.apply_env().map_err(LaunchError::Tuning)?;
    if launch.spin {
        opt.idle = crate::Idle::SPIN;
    }
    Ok(opt)
}
