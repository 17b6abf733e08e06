//! `imgdeploy drain`: retire the standby slot's mount by hand.

use std::time::Duration;

use anyhow::Result;

use crate::config::{Config, DrainTimeoutAction};
use crate::drain::{drain_slot, Retired};
use crate::lock::lock;
use crate::state::{Layout, SlotId};
use crate::switch::active_slot;

/// Waits for users of the standby slot's mount, then unmounts it (or
/// detaches it, as `on_drain_timeout` says, when they outlast `timeout`).
pub fn drain(cfg: &Config, timeout: Duration) -> Result<Retired> {
    let layout = Layout::create(&cfg.state_dir)?;
    let _lock = lock(&layout.root)?;
    let standby = active_slot(cfg, &layout)?.map(SlotId::other);
    let mut all = Retired::default();
    for slot in SlotId::ALL {
        // With nothing active, both slots are standby.
        if standby.is_none() || standby == Some(slot) {
            let r = drain_slot(&layout, slot, timeout, cfg.on_drain_timeout)?;
            all.still_in_use.extend(r.still_in_use);
            all.detached |= r.detached;
        }
    }
    debug_assert!(all.still_in_use.is_empty() || all.detached || cfg.on_drain_timeout == DrainTimeoutAction::Fail);
    Ok(all)
}
