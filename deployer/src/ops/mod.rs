//! The commands other than `apply`, one module each: [`mod@status`],
//! [`mod@verify`], [`mod@rollback`], [`boot_mount`] (`imgdeploy mount` at
//! boot) and [`mod@drain`]. Each reads the truth from `link`, the slots and the mount
//! table, and the ones that change anything take the state lock.

pub mod boot_mount;
pub mod drain;
pub mod rollback;
pub mod status;
pub mod verify;

pub use boot_mount::{mount_active, BootMount};
pub use drain::drain;
pub use rollback::rollback;
pub use status::status;
pub use verify::{verify, SlotCheck, SlotHealth};
