//! understudy-supervisor: the operator's side of a cluster of engines.
//!
//! It reads the cluster config ([`config`]), starts and watches the engine processes
//! ([`process`]), keeps an active and a hot standby running ([`daemon`]), performs long
//! operations such as the rolling upgrade (`ops`, one file per operation, driving the pure
//! state machine in [`plan`], whose progress [`record`] keeps on disk for a restarted
//! supervisor), and serves the control socket ([`proto`], [`client`]). [`doctor`] checks a
//! host.
//!
//! The loop in [`daemon`] owns the cluster (`cluster::Cluster`: config, directory, control
//! block, engines, managed slots) and lends it to the operation in progress through the
//! `cluster::ClusterOps` trait, so operations never see the loop's own bookkeeping and are
//! unit-tested against a fake cluster. The modules import one way: nothing imports
//! [`daemon`], and `ops` imports neither the loop nor the socket.
//!
//! It talks to engines only through the shared control block (`understudy_control::control`)
//! and process signals. It must never know how engines replicate, and cannot: it depends on
//! the control crate (the protocol), not on the runtime, whose store, rings and replication
//! are not its business; failover does not need it (a standby steps up by itself when its
//! active dies).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod client;
mod cluster;
pub mod config;
pub mod daemon;
pub mod doctor;
mod fence;
mod foreign;
pub mod metrics;
mod ops;
pub mod plan;
pub mod process;
pub mod proto;
pub mod record;
mod reload;
mod restarts;
mod signals;
mod socket;
mod status;
pub mod systemd;
mod up_error;
mod verify;
mod watch;
