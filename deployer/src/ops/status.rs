//! `imgdeploy status`: what is served, what each slot holds, what the
//! last apply and boot did, and which processes still use an old version.
//! Everything is read from `link`, the slots and the mount table.

use imgdeploy_common::report::one_line;
use std::path::PathBuf;

use anyhow::{Context, Result};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::sign::PublicKey;
use serde::Serialize;

use crate::config::Config;
use crate::drain::{detached, device_of, holders, Detached, Holder};
use crate::integrity::{of_mounted, Integrity};
use crate::mount::mounted_at;
use crate::slot::installed;
use crate::state::{ApplyRecord, BootRecord, Layout, SlotId, State};
use crate::switch::active_slot;
use crate::switch::current_target;

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
    /// The device it is mounted from, when mounted: `/dev/dm-N` (dm-verity
    /// over a loop device) or `/dev/loopN`.
    pub device: Option<String>,
    /// When mounted, how its reads are checked: `verity` (every block read,
    /// against the signed root hash) or `install-time` (the whole image was
    /// hashed once, before mounting).
    pub integrity: Option<Integrity>,
    /// dm-verity has found a block that does not match the tree (reads of it
    /// fail); `imgdeploy apply` or a re-download repairs the slot.
    pub corrupted: bool,
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
        integrity: None,
        corrupted: false,
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
        Err(e) => st.error = Some(one_line(&e)),
    }
    let target = layout.mount_point(slot);
    if let Ok(Some(m)) = mounted_at(&target) {
        st.users = device_of(&target).map(holders).unwrap_or_default();
        st.mounted = Some(target);
        st.device = Some(m.source);
        let (integrity, corrupted) = of_mounted(m.dev);
        st.integrity = Some(integrity);
        st.corrupted = corrupted;
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
        errors.push(one_line(&e));
        State::default()
    });
    let link_target = current_target(&cfg.link).unwrap_or_else(|e| {
        errors.push(one_line(&e));
        None
    });
    let active = active_slot(cfg, &layout).unwrap_or_else(|e| {
        errors.push(one_line(e.as_ref()));
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
