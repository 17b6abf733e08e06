//! `imgdeploy rollback`: switch `link` back to the standby slot's verified
//! version, remembering the serial rolled back from so the next apply does
//! not reinstall it.

use anyhow::{bail, Result};
use imgdeploy_common::report::Chain;

use crate::config::Config;
use crate::drain::{drain_slot, Retired};
use crate::lock::lock;
use crate::slot::ensure_mounted;
use crate::slot::installed;
use crate::state::{Layout, SlotId, State};
use crate::switch::active_slot;
use crate::switch::point_link;

/// Switches `link` back to the standby slot.
pub fn rollback(cfg: &Config) -> Result<(SlotId, u64, Retired)> {
    let layout = Layout::create(&cfg.state_dir)?;
    let _lock = lock(&layout.root)?;
    let mut state = State::load(&layout)?;
    let keys = cfg.trusted_keys()?;
    let Some(active) = active_slot(cfg, &layout)? else {
        bail!("nothing is active ({} does not exist); run `imgdeploy apply` first", cfg.link.display());
    };
    let standby = active.other();
    let Some(inst) = installed(&layout, standby, &keys)? else {
        let why = if layout.partial(standby).exists() {
            "an install into it was interrupted or refused before it completed; run `imgdeploy apply` to install the published version into it"
        } else if layout.image(standby).exists() {
            "its last install did not complete; run `imgdeploy apply` to install the published version into it"
        } else {
            "only one version has been deployed here"
        };
        bail!("slot {standby} holds no image to roll back to: {why}");
    };
    // The serial rolled back from, so the next apply does not reinstall it.
    // An active slot whose manifest no longer verifies has no serial to skip.
    let from = match installed(&layout, active, &keys) {
        Ok(i) => i.map(|i| i.manifest.serial),
        Err(e) => {
            tracing::warn!("{}; the next apply may install the published version again", Chain(&e));
            None
        }
    };
    ensure_mounted(cfg, &layout, &inst, None)?;
    // Durable before the switch: a power cut after the switch must not let
    // the next timer run reinstall what the operator just rolled back.
    state.rolled_back_serial = from;
    state.save(&layout)?;
    point_link(&cfg.link, &layout.mount_point(standby))?;
    state.active = Some(standby);
    state.save(&layout)?;
    tracing::info!("rolled back to slot {standby} (serial {})", inst.manifest.serial);
    let retired = drain_slot(&layout, active, cfg.drain_timeout, cfg.on_drain_timeout)?;
    Ok((standby, inst.manifest.serial, retired))
}
