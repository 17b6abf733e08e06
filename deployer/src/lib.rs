//! `imgdeploy`: runs on every frontend. It keeps two slots (A/B), downloads
//! a signed image into the standby one, verifies it, loop-mounts it read-only
//! and switches an `active` symlink with one `rename(2)`, then drains and
//! unmounts the old version.
//!
//! Modules, in the order an apply uses them: [`config`], [`lock`],
//! [`state`], [`fetch`], [`decide`] (what to do with a verified manifest: a
//! pure function), [`slot`] (a slot's verified manifest and image, and
//! mounting it), [`loopdev`], [`integrity`] (dm-verity under every mount, over
//! [`devmapper`]) and [`mount`], [`hooks`], [`switch`] (which
//! slot `link` names, and repointing it), [`drain`] (retiring an old slot:
//! unmount or detach); [`apply`] strings them together and nothing depends
//! on it but the command line; [`ops`] holds the other commands (a module each), [`metrics`]
//! the Prometheus file, [`boot`] the netboot `/init`, and [`cli`] the
//! command line.

pub mod apply;
pub mod boot;
pub mod cli;
pub mod config;
pub mod decide;
pub mod delta;
pub mod devmapper;
pub mod drain;
pub mod fetch;
pub mod hooks;
pub mod integrity;
pub mod lock;
pub mod loopdev;
pub mod metrics;
pub mod mount;
pub mod ops;
pub mod parallel_check;
pub mod readback;
pub mod safety;
pub mod slot;
pub mod state;
pub mod static_delta;
pub mod switch;
