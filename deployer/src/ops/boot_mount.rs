//! `imgdeploy mount` (the boot unit): mount the active slot again after a
//! reboot, falling back to the other verified slot when the active one no
//! longer checks out.

use anyhow::{bail, Result};
use imgdeploy_common::manifest::Timestamp;
use imgdeploy_common::report::one_line;
use imgdeploy_common::sign::PublicKey;

use crate::config::Config;
use crate::lock::lock;
use crate::slot::ensure_mounted;
use crate::slot::installed;
use crate::state::{BootRecord, Layout, SlotId, State};
use crate::switch::active_slot;
use crate::switch::{current_target, point_link};

/// What `imgdeploy mount` did at boot.
#[derive(Debug)]
pub enum BootMount {
    /// Nothing has been deployed on this host yet.
    NothingDeployed,
    /// The active slot verified and is mounted.
    Mounted {
        /// The slot.
        slot: SlotId,
        /// Its serial.
        serial: u64,
    },
}

/// Verifies and mounts `slot`'s installed image; the error says why it cannot serve.
fn mount_installed(cfg: &Config, layout: &Layout, slot: SlotId, keys: &[PublicKey]) -> Result<u64> {
    let Some(inst) = installed(layout, slot, keys)? else {
        bail!("slot {slot} holds no installed image");
    };
    ensure_mounted(cfg, layout, &inst, None)?;
    Ok(inst.manifest.serial)
}

/// At boot: verify and mount the active slot and restore `link`
/// (idempotent). When the active slot's image no longer verifies, the other
/// slot's verified image is mounted and `link` repointed to it, the reason is
/// recorded, and the error names both slots: a host always boots serving a
/// verified version when it has one.
pub fn mount_active(cfg: &Config) -> Result<BootMount> {
    let layout = Layout::create(&cfg.state_dir)?;
    let _lock = lock(&layout.root)?;
    let mut state = State::load(&layout)?;
    let keys = cfg.trusted_keys()?;
    crate::safety::warn_if_closed_to_readers(&layout.root.join("mnt"), "the mount points in");
    let slot = match active_slot(cfg, &layout)? {
        Some(s) => s,
        None => match state.active {
            Some(s) => s,
            None => return Ok(BootMount::NothingDeployed),
        },
    };
    let record =
        |state: &mut State, slot: SlotId, serial: Option<u64>, fallback_from: Option<SlotId>, message: String| {
            state.last_boot = Some(BootRecord { time: Timestamp::now(), slot, serial, fallback_from, message });
            state.active = Some(slot);
            state.save(&layout)?;
            if let Some(path) = &cfg.metrics_file {
                // The boot's outcome is already recorded in the state file; a metrics failure must not mask it.
                if let Err(e) = crate::metrics::write(cfg, &layout, state, path) {
                    tracing::warn!("cannot write metrics to {}: {}", path.display(), one_line(e.as_ref()));
                }
            }
            anyhow::Ok(())
        };
    let serve = |slot: SlotId| -> Result<u64> {
        let serial = mount_installed(cfg, &layout, slot, &keys)?;
        let target = layout.mount_point(slot);
        if current_target(&cfg.link)?.as_deref() != Some(target.as_path()) {
            point_link(&cfg.link, &target)?;
        }
        Ok(serial)
    };
    let why = match serve(slot) {
        Ok(serial) => {
            record(&mut state, slot, Some(serial), None, format!("mounted slot {slot} (serial {serial})"))?;
            return Ok(BootMount::Mounted { slot, serial });
        }
        Err(e) => e,
    };
    let other = slot.other();
    tracing::warn!("active slot {slot} cannot be served: {why:#}; trying slot {other}");
    match serve(other) {
        Ok(serial) => {
            let message = format!(
                "active slot {slot} failed at boot ({why:#}); serving slot {other} (serial {serial}) instead; run `imgdeploy apply` to reinstall slot {slot}"
            );
            record(&mut state, other, Some(serial), Some(slot), message.clone())?;
            bail!("{message}")
        }
        Err(e2) => {
            let message = format!(
                "neither slot can be served: active slot {slot}: {why:#}; slot {other}: {e2:#}; run `imgdeploy apply` to install the published version"
            );
            record(&mut state, slot, None, None, message.clone())?;
            bail!("{message}")
        }
    }
}
