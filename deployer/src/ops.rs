//! The other commands: `status`, `verify`, `rollback`, `mount` (at boot) and
//! `drain`. Each reads the truth from `link`, the slots and the mount table,
//! and the ones that change anything take the state lock.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::sign::PublicKey;
use serde::Serialize;

use crate::apply::{active_slot, drain_slot, ensure_mounted};
use crate::config::Config;
use crate::drain::{device_of, holders, Holder};
use crate::lock::lock;
use crate::mount::mounted_at;
use crate::slot::{installed, open_verified};
use crate::state::{ApplyRecord, Layout, SlotId, State};
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
    /// The last apply.
    pub last_apply: Option<ApplyRecord>,
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
        .find_map(|slot| std::fs::metadata(layout.partial(slot)).ok().map(|m| Pending { slot, bytes: m.len() }));
    Ok(Status {
        format: 1,
        link: cfg.link.clone(),
        link_target,
        active: a,
        standby: s,
        pending,
        rolled_back_serial: state.rolled_back_serial,
        last_apply: state.last_apply,
        errors,
    })
}

/// Result of `verify` for one slot.
#[derive(Debug, Serialize)]
pub struct SlotCheck {
    /// The slot.
    pub slot: SlotId,
    /// `ok`, `empty` or `bad`.
    pub result: &'static str,
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
            Ok(None) => SlotCheck { slot, result: "empty", serial: None, message: "no image installed".into() },
            Ok(Some(i)) => match open_verified(&layout, slot, &i.manifest) {
                Ok(_) => SlotCheck {
                    slot,
                    result: "ok",
                    serial: Some(i.manifest.serial),
                    message: format!(
                        "serial {} ({}), sha256 {} verified",
                        i.manifest.serial, i.manifest.version, i.manifest.image.sha256
                    ),
                },
                Err(e) => SlotCheck { slot, result: "bad", serial: Some(i.manifest.serial), message: e.to_string() },
            },
            Err(e) => SlotCheck { slot, result: "bad", serial: None, message: e.to_string() },
        })
        .collect())
}

/// Switches `link` back to the standby slot.
pub fn rollback(cfg: &Config) -> Result<(SlotId, u64, Vec<Holder>)> {
    let layout = Layout::create(&cfg.state_dir)?;
    let _lock = lock(&layout.root)?;
    let mut state = State::load(&layout)?;
    let keys = cfg.trusted_keys()?;
    let Some(active) = active_slot(cfg, &layout)? else {
        bail!("nothing is active ({} does not exist); run `imgdeploy apply` first", cfg.link.display());
    };
    let standby = active.other();
    let Some(inst) = installed(&layout, standby, &keys)? else {
        bail!("slot {standby} holds no image to roll back to; only one version has been deployed here");
    };
    let from = installed(&layout, active, &keys).ok().flatten().map(|i| i.manifest.serial);
    ensure_mounted(cfg, &layout, &inst, None)?;
    point_link(&cfg.link, &layout.mount_point(standby))?;
    state.active = Some(standby);
    state.rolled_back_serial = from;
    state.save(&layout)?;
    tracing::info!("rolled back to slot {standby} (serial {})", inst.manifest.serial);
    let left = drain_slot(&layout, active, cfg.drain_timeout)?;
    Ok((standby, inst.manifest.serial, left))
}

/// At boot: mount the active slot and restore `link`. Idempotent.
pub fn mount_active(cfg: &Config) -> Result<Option<(SlotId, u64)>> {
    let layout = Layout::create(&cfg.state_dir)?;
    let _lock = lock(&layout.root)?;
    let state = State::load(&layout)?;
    let keys = cfg.trusted_keys()?;
    let slot = match active_slot(cfg, &layout)? {
        Some(s) => s,
        None => match state.active {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    let Some(inst) = installed(&layout, slot, &keys)? else {
        bail!("slot {slot} is recorded as active but holds no verified image; run `imgdeploy apply`");
    };
    ensure_mounted(cfg, &layout, &inst, None)?;
    let target = layout.mount_point(slot);
    if current_target(&cfg.link)?.as_deref() != Some(target.as_path()) {
        point_link(&cfg.link, &target)?;
    }
    Ok(Some((slot, inst.manifest.serial)))
}

/// Waits for users of the standby slot's mount, then unmounts it.
pub fn drain(cfg: &Config, timeout: Duration) -> Result<Vec<Holder>> {
    let layout = Layout::create(&cfg.state_dir)?;
    let _lock = lock(&layout.root)?;
    let standby = active_slot(cfg, &layout)?.map(SlotId::other);
    let mut left = Vec::new();
    for slot in SlotId::ALL {
        // With nothing active, both slots are standby.
        if standby.is_none() || standby == Some(slot) {
            left.extend(drain_slot(&layout, slot, timeout)?);
        }
    }
    Ok(left)
}
