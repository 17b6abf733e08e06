//! The other commands: `status`, `verify`, `rollback`, `mount` (at boot) and
//! `drain`. Each reads the truth from `link`, the slots and the mount table,
//! and the ones that change anything take the state lock.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::Timestamp;
use imgdeploy_common::sign::PublicKey;
use serde::Serialize;

use crate::config::{Config, DrainTimeoutAction};
use crate::drain::{detached, device_of, drain_slot, holders, Detached, Holder, Retired};
use crate::lock::lock;
use crate::mount::mounted_at;
use crate::slot::ensure_mounted;
use crate::slot::{installed, open_verified};
use crate::state::{ApplyRecord, BootRecord, Layout, SlotId, State};
use crate::switch::active_slot;
use crate::switch::{current_target, point_link};

/// One slot in `status`.
#[derive(Debug, Serialize)]
pub struct SlotStatus {
    /// `a` or `b`.
    pub slot: SlotId,
    /// Whether it holds a verified image.
    pub installed: bool,
    /// Serial of its image.
    pub serial: Option<u64>,
    /// Version label.
    pub version: Option<String>,
    /// Channel.
    pub channel: Option<String>,
    /// Image sha256.
    pub sha256: Option<Sha256Digest>,
    /// Image size.
    pub size: Option<u64>,
    /// Manifest expiry.
    pub expires: Option<String>,
    /// Mount point, when mounted.
    pub mounted: Option<PathBuf>,
    /// Loop device, when mounted.
    pub device: Option<String>,
    /// Processes using the mount.
    pub users: Vec<Holder>,
    /// Why the slot is unusable, if it is.
    pub error: Option<String>,
}

/// A download in progress.
#[derive(Debug, Serialize)]
pub struct Pending {
    /// The slot being filled.
    pub slot: SlotId,
    /// Bytes already downloaded.
    pub bytes: u64,
}

/// `status --json` (schema documented in README.md; fields are only ever added).
#[derive(Debug, Serialize)]
pub struct Status {
    /// Schema version, 1.
    pub format: u32,
    /// The configured link.
    pub link: PathBuf,
    /// Where it points.
    pub link_target: Option<PathBuf>,
    /// The slot `link` points at.
    pub active: Option<SlotStatus>,
    /// The other slot.
    pub standby: Option<SlotStatus>,
    /// A download in progress.
    pub pending: Option<Pending>,
    /// A serial rolled back from.
    pub rolled_back_serial: Option<u64>,
    /// Per channel, the highest serial accepted here and why; older
    /// manifests are refused as replays.
    pub floor: std::collections::BTreeMap<String, crate::decide::Floor>,
    /// The last apply.
    pub last_apply: Option<ApplyRecord>,
    /// What the last `imgdeploy mount` (at boot) did, including a fallback to the other slot.
    pub last_boot: Option<BootRecord>,
    /// Old versions detached while processes were still inside them (they
    /// go away when those processes exit).
    pub detached: Vec<Detached>,
    /// Problems found (corrupt state file, link outside our control).
    pub errors: Vec<String>,
}

fn slot_status(layout: &Layout, slot: SlotId, keys: &[PublicKey]) -> SlotStatus {
    let mut st = SlotStatus {
        slot,
        installed: false,
        serial: None,
        version: None,
        channel: None,
        sha256: None,
        size: None,
        expires: None,
        mounted: None,
        device: None,
        users: Vec::new(),
        error: None,
    };
    match installed(layout, slot, keys) {
        Ok(Some(i)) => {
            let m = i.manifest;
            st.installed = true;
            st.serial = Some(m.serial);
            st.version = Some(m.version);
            st.channel = Some(m.channel);
            st.sha256 = Some(m.image.sha256);
            st.size = Some(m.image.size);
            st.expires = Some(m.expires.to_string());
        }
        Ok(None) => {}
        Err(e) => st.error = Some(e.to_string()),
    }
    let target = layout.mount_point(slot);
    if let Ok(Some(m)) = mounted_at(&target) {
        st.users = device_of(&target).map(holders).unwrap_or_default();
        st.mounted = Some(target);
        st.device = Some(m.source);
    }
    st
}

/// Gathers the status.
pub fn status(cfg: &Config) -> Result<Status> {
    let layout =
        Layout::create(&cfg.state_dir).with_context(|| format!("opening state_dir {}", cfg.state_dir.display()))?;
    let keys = cfg.trusted_keys()?;
    let mut errors = Vec::new();
    let state = State::load(&layout).unwrap_or_else(|e| {
        errors.push(e.to_string());
        State::default()
    });
    let link_target = current_target(&cfg.link).unwrap_or_else(|e| {
        errors.push(e.to_string());
        None
    });
    let active = active_slot(cfg, &layout).unwrap_or_else(|e| {
        errors.push(format!("{e:#}"));
        None
    });
    let (a, s) = match active {
        Some(x) => (Some(slot_status(&layout, x, &keys)), Some(slot_status(&layout, x.other(), &keys))),
        None => (None, Some(slot_status(&layout, state.active.map(SlotId::other).unwrap_or(SlotId::A), &keys))),
    };
    let pending = SlotId::ALL
        .into_iter()
        // No partial download (NotFound) is the usual case; status reports, it does not fail.
        .find_map(|slot| std::fs::metadata(layout.partial(slot)).ok().map(|m| Pending { slot, bytes: m.len() }));
    Ok(Status {
        format: 1,
        link: cfg.link.clone(),
        link_target,
        active: a,
        standby: s,
        pending,
        rolled_back_serial: state.rolled_back_serial,
        floor: state.floor,
        last_apply: state.last_apply,
        last_boot: state.last_boot,
        detached: detached(&layout),
        errors,
    })
}

/// What `verify` found in a slot (`ok`, `empty`, `bad` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotHealth {
    /// Its image matches its signed manifest.
    Ok,
    /// Nothing installed.
    Empty,
    /// The manifest or the image does not check out.
    Bad,
}

impl std::fmt::Display for SlotHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotHealth::Ok => "ok",
            SlotHealth::Empty => "empty",
            SlotHealth::Bad => "bad",
        })
    }
}

/// Result of `verify` for one slot.
#[derive(Debug, Serialize)]
pub struct SlotCheck {
    /// The slot.
    pub slot: SlotId,
    /// What was found.
    pub result: SlotHealth,
    /// Serial, if installed.
    pub serial: Option<u64>,
    /// Details.
    pub message: String,
}

/// Re-hashes both slots against their signed manifests.
pub fn verify(cfg: &Config) -> Result<Vec<SlotCheck>> {
    let layout = Layout::create(&cfg.state_dir)?;
    let keys = cfg.trusted_keys()?;
    Ok(SlotId::ALL
        .into_iter()
        .map(|slot| match installed(&layout, slot, &keys) {
            Ok(None) => {
                SlotCheck { slot, result: SlotHealth::Empty, serial: None, message: "no image installed".into() }
            }
            Ok(Some(i)) => match open_verified(&layout, slot, &i.manifest) {
                Ok(_) => SlotCheck {
                    slot,
                    result: SlotHealth::Ok,
                    serial: Some(i.manifest.serial),
                    message: format!(
                        "serial {} ({}), sha256 {} verified",
                        i.manifest.serial, i.manifest.version, i.manifest.image.sha256
                    ),
                },
                Err(e) => {
                    SlotCheck { slot, result: SlotHealth::Bad, serial: Some(i.manifest.serial), message: e.to_string() }
                }
            },
            Err(e) => SlotCheck { slot, result: SlotHealth::Bad, serial: None, message: e.to_string() },
        })
        .collect())
}

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
            tracing::warn!("{e}; the next apply may install the published version again");
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
                    tracing::warn!("cannot write metrics to {}: {e:#}", path.display());
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
