//! `imgdeploy apply`: one full update cycle, as a sequence of steps each of
//! which can tell whether it is already done, so a rerun after a crash picks
//! up where the last run stopped:
//!
//! 1. fetch and verify the manifest (signature, channel, expiry, serial);
//! 2. pick the standby slot and make sure no process uses its old mount;
//! 3. download the image into it (resuming), hashing while streaming;
//! 4. verify size and sha256 again through the fd the loop device will use,
//!    then mount it read-only;
//! 5. run `health_check` against the new mount;
//! 6. switch `link` with one `rename(2)`, record the state;
//! 7. run `post_switch`, then drain and unmount the old slot.
//!
//! Until step 6 the active version is untouched; every failure before it
//! unmounts what it mounted and leaves `link` where it was.

use imgdeploy_common::report::Chain;
use std::fs::File;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use imgdeploy_common::atomic::{fsync_dir, write_atomic};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::location::Location;
use imgdeploy_common::manifest::Timestamp;
use imgdeploy_common::transport::Transport;
use imgdeploy_common::verity::Verity;
use serde::Serialize;

use crate::config::Config;
use crate::decide::{decide, Decision, Facts, FloorReason};
use crate::delta::{self, fetch_index, local_seeds};
use crate::drain::{drain_slot, release_slot, Retired};
use crate::fetch::{download_image, fetch_manifest, DownloadStats, TransferMode};
use crate::hooks::run_hook;
use crate::lock::lock;
use crate::mount::MountGuard;
use crate::safety::warn_if_closed_to_readers;
use crate::slot::ensure_mounted;
use crate::slot::{installed, open_verified, Installed, SlotError};
use crate::state::{ApplyRecord, ApplyResult, Layout, SlotId, State};
use crate::switch::{active_slot, point_link};

/// What an apply did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Already at the published serial.
    UpToDate {
        /// The serial.
        serial: u64,
        /// Why nothing was done.
        message: String,
    },
    /// Switched to a new image.
    Switched {
        /// The new serial.
        serial: u64,
        /// Its version label.
        version: String,
        /// The slot now active.
        slot: SlotId,
        /// Transfer figures.
        download: DownloadStats,
        /// How the old slot was retired: `still_in_use` (processes still
        /// holding it after the drain timeout) and `detached`.
        #[serde(flatten)]
        retired: Retired,
        /// How long the switch itself (temp symlink, rename, directory fsync) took.
        switch_micros: u64,
    },
    /// A staged rollout that does not include this host yet.
    NotInWave {
        /// The serial rolling out.
        serial: u64,
        /// Its rollout percentage.
        percent: u8,
        /// Why nothing was done.
        message: String,
    },
    /// `--dry-run`: what an update would transfer; nothing was changed.
    WouldUpdate {
        /// The serial that would be installed.
        serial: u64,
        /// Delta or full.
        mode: TransferMode,
        /// Image bytes that would be downloaded.
        download_bytes: u64,
        /// HTTP requests for image data.
        requests: u64,
        /// Image bytes found on this host.
        reused_bytes: u64,
        /// Bytes of the dm-verity hash tree that would be computed here.
        computed_bytes: u64,
        /// The image's size.
        image_size: u64,
        /// The chunk index's size (fetched in both modes when published).
        index_bytes: u64,
    },
}

/// Options of one apply.
#[derive(Debug, Default, Clone)]
pub struct ApplyOptions {
    /// Overrides the configured source.
    pub source: Option<String>,
    /// Only report what would be downloaded.
    pub dry_run: bool,
    /// Re-hash the whole active image first (`imgdeploy repair`); without
    /// it, only dm-verity's record of corrupted reads counts as damage.
    pub check_active: bool,
}

/// Why the active slot needs repair, if it does: dm-verity has failed a
/// read of it (free to ask, so every apply asks), or, with `full`, its image
/// no longer hashes to the signed sha256.
fn active_damage(layout: &Layout, active: &Installed, full: bool) -> Option<String> {
    if crate::integrity::of_mount_point(&layout.mount_point(active.slot)).is_some_and(|(_, corrupted)| corrupted) {
        return Some("dm-verity found corrupted blocks in it".into());
    }
    if full {
        if let Err(e) = open_verified(layout, active.slot, &active.manifest) {
            return Some(imgdeploy_common::report::one_line(&e));
        }
    }
    None
}

/// Computes what an update would transfer, changing nothing: a static
/// delta from an image in `held` if the manifest lists one (assuming it
/// reproduces, as the builder checked), else the chunk delta.
fn dry_run(
    t: &Transport,
    fetched: &crate::fetch::FetchedManifest,
    layout: &Layout,
    held: &[(SlotId, Sha256Digest)],
) -> Result<Outcome> {
    let m = &fetched.verified.manifest;
    let full = |index_bytes| Outcome::WouldUpdate {
        serial: m.serial,
        mode: TransferMode::Full,
        download_bytes: m.image.size,
        requests: 1,
        reused_bytes: 0,
        computed_bytes: 0,
        image_size: m.image.size,
        index_bytes,
    };
    // A static delta needs no chunk index (nothing is fetched by chunk).
    if let Some((_, d)) = crate::static_delta::pick(m, held) {
        let data = m.image.data_size();
        return Ok(Outcome::WouldUpdate {
            serial: m.serial,
            mode: TransferMode::StaticDelta,
            download_bytes: d.size,
            requests: 1,
            reused_bytes: data,
            computed_bytes: m.image.size - data,
            image_size: m.image.size,
            index_bytes: 0,
        });
    }
    let Some(r) = &m.index else { return Ok(full(0)) };
    let idx = match fetch_index(t, &fetched.location, r, m) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("{}; an update would download the whole image", Chain(&e));
            return Ok(full(0));
        }
    };
    let seeds = local_seeds(layout, &idx.index, &m.image.sha256, true);
    if seeds.is_empty() {
        return Ok(full(r.size));
    }
    let st = delta::estimate(m, &idx.index, &seeds)?;
    Ok(Outcome::WouldUpdate {
        serial: m.serial,
        mode: TransferMode::Delta,
        download_bytes: st.downloaded,
        requests: st.requests,
        reused_bytes: st.reused,
        computed_bytes: st.computed,
        image_size: m.image.size,
        index_bytes: r.size,
    })
}

/// Runs one apply cycle.
pub fn apply(cfg: &Config, opts: &ApplyOptions) -> Result<Outcome> {
    let started = Instant::now();
    let layout =
        Layout::create(&cfg.state_dir).with_context(|| format!("preparing state_dir {}", cfg.state_dir.display()))?;
    let _lock = lock(&layout.root)?;
    let mut state = State::load(&layout)?;
    let result = apply_locked(cfg, opts, &layout, &mut state);
    if opts.dry_run {
        // A dry run records nothing.
        return result;
    }
    let record = match &result {
        Ok(o) => {
            let (result, serial, message, dl) = match o {
                Outcome::WouldUpdate { serial, .. } => (ApplyResult::DryRun, *serial, String::new(), 0),
                Outcome::NotInWave { serial, message, .. } => (ApplyResult::NotInWave, *serial, message.clone(), 0),
                Outcome::UpToDate { serial, message } => (ApplyResult::UpToDate, *serial, message.clone(), 0),
                Outcome::Switched { serial, version, slot, download, .. } => (
                    ApplyResult::Switched,
                    *serial,
                    format!("switched to serial {serial} ({version}) in slot {slot}"),
                    download.downloaded,
                ),
            };
            ApplyRecord {
                time: Timestamp::now(),
                result,
                serial: Some(serial),
                message,
                duration_ms: 0,
                bytes_downloaded: dl,
                bytes_reused: 0,
            }
        }
        Err(e) => ApplyRecord {
            time: Timestamp::now(),
            result: ApplyResult::Failed,
            serial: None,
            message: imgdeploy_common::report::one_line(e.as_ref()),
            duration_ms: 0,
            bytes_downloaded: 0,
            bytes_reused: 0,
        },
    };
    let reused = match &result {
        Ok(Outcome::Switched { download, .. }) => download.reused,
        _ => 0,
    };
    state.last_apply =
        Some(ApplyRecord { duration_ms: started.elapsed().as_millis() as u64, bytes_reused: reused, ..record });
    // Recording the result must not mask the apply's own error.
    if let Err(e) = state.save(&layout) {
        tracing::warn!("{}", Chain(&e));
    }
    if let Some(path) = &cfg.metrics_file {
        if let Err(e) = crate::metrics::write(cfg, &layout, &state, path) {
            tracing::warn!("cannot write metrics to {}: {}", path.display(), Chain(e.as_ref()));
        }
    }
    result
}

/// Step 3 of an update: brings the image of `fetched` into `standby` (a
/// delta from local chunks when an index is published, else a resumable full
/// download, both within one `download_timeout`) and installs it there.
/// Returns what was transferred and the image file, verified as it was written.
fn download_into(
    cfg: &Config,
    layout: &Layout,
    t: &Transport,
    fetched: &crate::fetch::FetchedManifest,
    standby: SlotId,
    held: &[(SlotId, Sha256Digest)],
    trees: &[(SlotId, Verity)],
) -> Result<(DownloadStats, File)> {
    let m = &fetched.verified.manifest;
    let image_transport = t.with_timeouts(Duration::from_secs(60), cfg.download_timeout);
    let image_loc = fetched.location.sibling(&m.image.path);
    // download_timeout bounds the image transfer as a whole: the static
    // delta, every Range request of a chunk delta, and a full download
    // that falls back from them.
    let budget = delta::Budget::starting_now(cfg.download_timeout);
    // A static delta from an image a slot holds fills the partial first.
    let mut made = None;
    if let Some((from, d)) = crate::static_delta::pick(m, held) {
        let old_tree = trees.iter().find(|(s, _)| *s == from).map(|(_, v)| v);
        match crate::static_delta::fetch_and_apply(
            t,
            budget,
            &fetched.location,
            m,
            d,
            (from, old_tree),
            layout,
            standby,
        ) {
            Ok(st) => made = Some(st),
            Err(e) => tracing::warn!("static delta not used: {}; going on with the chunk delta", Chain(&e)),
        }
    }
    // Everything reproduced: one read of the data checks it all, and no
    // chunk index is needed (the next chunk delta computes this slot's).
    if let Some(st) = made.as_mut().filter(|s| s.applied.unreproduced_bytes == 0) {
        let out = st.out.take().expect("a static delta returns its output");
        match crate::static_delta::finish(&out, m, st.old_leaves.take()) {
            Ok(true) => {
                let stats = DownloadStats {
                    mode: TransferMode::StaticDelta,
                    downloaded: st.fetched,
                    static_delta: st.fetched,
                    requests: u64::from(st.fetched > 0),
                    patched: st.applied.patched,
                    reused: st.applied.copied,
                    computed: m.image.size - m.image.data_size(),
                    ..Default::default()
                };
                install_verified(layout, standby, fetched, None)?;
                tracing::info!("slot {standby}: installed serial {} from the static delta", m.serial);
                return Ok((stats, out));
            }
            Ok(false) => tracing::warn!("the static delta's image is not the signed one; checking it chunk by chunk"),
            Err(e) => tracing::warn!("cannot finish the static delta's image ({e}); checking it chunk by chunk"),
        }
    }
    // The chunk index is fetched whenever one is published: for this
    // delta (and what a static delta left to check), and stored with the
    // slot as the seed of the next one.
    let index = match &m.index {
        Some(r) => match fetch_index(t, &fetched.location, r, m) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!("{}; falling back to a full download", Chain(&e));
                None
            }
        },
        None => None,
    };
    // The standby's old image stays installed (a rollback target, and a
    // seed of this delta) until the new image has been verified; only
    // then does one replace the other (`install_verified`).
    let seeds = match &index {
        Some(i) => local_seeds(layout, &i.index, &m.image.sha256, false),
        None => Vec::new(),
    };
    let mut delta_done = None;
    let mut full_transport = image_transport.clone();
    if let Some(idx) = &index {
        if seeds.is_empty() && made.is_none() {
            tracing::info!("no local image to reuse chunks from; downloading the whole image");
        } else {
            match delta::build(&image_transport, budget, &image_loc, m, &idx.index, &seeds, layout, standby) {
                Ok(done) => delta_done = Some(done),
                Err(e @ delta::DeltaError::Timeout { .. }) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!("delta update failed: {}; falling back to a full download", Chain(&e));
                    for p in [layout.partial(standby), layout.partial_meta(standby)] {
                        // Absent is fine; a real problem shows up in the full download.
                        let _ = std::fs::remove_file(p);
                    }
                    let left = budget.deadline.saturating_duration_since(Instant::now());
                    full_transport = t.with_timeouts(Duration::from_secs(60).min(left), left);
                }
            }
        }
    }
    drop(seeds);
    let (download, file) = match delta_done {
        Some((st, f)) => {
            tracing::info!(
                "delta: reused {} bytes from local images, {} already in place, computed {} bytes of hash tree, downloaded {} bytes in {} requests ({} of {} chunks)",
                st.reused,
                st.resumed,
                st.computed,
                st.downloaded,
                st.requests,
                st.chunks_fetched,
                st.chunks
            );
            let mut stats = DownloadStats {
                mode: TransferMode::Delta,
                downloaded: st.downloaded,
                resumed_from: st.resumed,
                reused: st.reused,
                computed: st.computed,
                requests: st.requests,
                ..Default::default()
            };
            if let Some(s) = &made {
                // What the static delta made is what the chunk delta found in place.
                stats.mode = TransferMode::StaticDelta;
                stats.static_delta = s.fetched;
                stats.downloaded += s.fetched;
                stats.requests += u64::from(s.fetched > 0);
                stats.patched = s.applied.patched.min(st.resumed);
                stats.reused += st.resumed - stats.patched;
                stats.resumed_from = 0;
            }
            (stats, f)
        }
        None => download_image(&full_transport, &image_loc, m, layout, standby)?,
    };
    install_verified(layout, standby, fetched, index.as_ref().map(|i| i.bytes.as_slice()))?;
    tracing::info!(
        "slot {standby}: installed serial {} ({} bytes downloaded, {} reused, {} resumed)",
        m.serial,
        download.downloaded,
        download.reused,
        download.resumed_from
    );
    Ok((download, file))
}

/// Carries out every decision but "install": refusing, or recording what
/// the manifest taught (the running image re-signed, a wave this host is not
/// in) and saying so. `None` means install.
fn settle(
    decision: Decision,
    cfg: &Config,
    opts: &ApplyOptions,
    layout: &Layout,
    state: &mut State,
    fetched: &crate::fetch::FetchedManifest,
    active_inst: Option<&Installed>,
) -> Result<Option<Outcome>> {
    let m = &fetched.verified.manifest;
    let outcome = match decision {
        Decision::Refuse(r) => return Err(r.into()),
        Decision::UpToDate { resigned } => {
            let cur = active_inst.expect("up to date only with an active slot");
            if let Some(why) = active_damage(layout, cur, opts.check_active) {
                // Repair: the same signed image goes into the other slot,
                // from the good chunks of both slots plus Range requests for
                // the damaged ones, and the usual switch and drain follow.
                tracing::warn!(
                    "slot {} (serial {}) is damaged: {why}; repairing it into slot {}",
                    cur.slot,
                    cur.manifest.serial,
                    cur.slot.other()
                );
                return Ok(None);
            }
            if opts.check_active {
                tracing::info!(
                    "slot {} (serial {}): its image matches the signed sha256",
                    cur.slot,
                    cur.manifest.serial
                );
            }
            if resigned && !opts.dry_run {
                // The running image under a newer serial (rollout change,
                // promotion): the slot's record and the floor follow it.
                record_manifest(layout, cur.slot, fetched, None)?;
                state.raise_floor(m, FloorReason::ReSigned);
                state.save(layout)?;
            }
            // After a reboot the link may point at an unmounted slot: repair that.
            ensure_mounted(cfg, layout, cur, None)?;
            let message = if resigned {
                format!("already running the image of serial {} ({}) in slot {}", m.serial, m.version, cur.slot)
            } else {
                format!("already at serial {} ({}) in slot {}", m.serial, m.version, cur.slot)
            };
            Outcome::UpToDate { serial: m.serial, message }
        }
        Decision::RolledBack => {
            let c = &active_inst.expect("rolled back only with an active slot").manifest;
            Outcome::UpToDate {
                serial: c.serial,
                message: format!(
                    "serial {} was rolled back on this host; staying at serial {} until a newer serial is published",
                    m.serial, c.serial
                ),
            }
        }
        Decision::NotInWave => {
            if !opts.dry_run {
                state.raise_floor(m, FloorReason::NotInWave);
                state.save(layout)?;
            }
            let percent = m.rollout.unwrap_or(100);
            Outcome::NotInWave {
                serial: m.serial,
                percent,
                message: format!(
                    "serial {} ({}) is rolling out to {percent}% of hosts; this host is not in the wave yet",
                    m.serial, m.version
                ),
            }
        }
        Decision::Install => return Ok(None),
    };
    Ok(Some(outcome))
}

fn apply_locked(cfg: &Config, opts: &ApplyOptions, layout: &Layout, state: &mut State) -> Result<Outcome> {
    // Before any work: the switch will happen in this directory.
    let link_dir = imgdeploy_common::atomic::parent_dir(&cfg.link);
    crate::safety::check_dir(&link_dir, "the directory of link")?;
    warn_if_closed_to_readers(&link_dir, "the directory of link");
    warn_if_closed_to_readers(&layout.root.join("mnt"), "the mount points in");
    let keys = cfg.trusted_keys()?;
    // Manifests and indexes are small: a minute each. Images get download_timeout.
    let transport = cfg.transport(Duration::from_secs(60), Duration::from_secs(60))?;
    let source = opts.source.as_deref().map(Location::parse).unwrap_or_else(|| cfg.source.clone());

    // 1. Manifest.
    let fetched = fetch_manifest(&transport, &source, &keys, &cfg.channel)?;
    let m = fetched.verified.manifest.clone();
    tracing::info!(
        "{source}: channel {} serial {} ({}), signed by {}",
        m.channel,
        m.serial,
        m.version,
        fetched.verified.key_id
    );
    let active = active_slot(cfg, layout)?;
    let active_inst = match active.map(|s| installed(layout, s, &keys)) {
        None => None,
        Some(Ok(inst)) => inst,
        // Signed by a key no longer trusted (a rotation this host missed) or
        // damaged: it decides nothing (no floor, no up-to-date), and the
        // verified manifest just fetched installs into the other slot.
        Some(Err(e @ SlotError::Manifest { .. })) => {
            tracing::warn!("{}; installing the published version beside it", Chain(&e));
            None
        }
        Some(Err(e)) => return Err(e.into()),
    };
    let in_wave = match m.rollout {
        Some(percent) => Some(imgdeploy_common::rollout::in_wave(&cfg.machine_id()?, &m.image.sha256, percent)),
        None => None,
    };
    let decision = decide(Facts {
        fetched: &m,
        active: active_inst.as_ref().map(|i| (i.slot, &i.manifest)),
        floor: state.floor.get(&m.channel),
        rolled_back_serial: state.rolled_back_serial,
        allow_downgrade: cfg.allow_downgrade,
        in_wave,
    });
    if let Some(outcome) = settle(decision, cfg, opts, layout, state, &fetched, active_inst.as_ref())? {
        return Ok(outcome);
    }

    // 2. Standby slot.
    let standby = active.map(SlotId::other).unwrap_or(SlotId::A);
    let standby_inst = installed(layout, standby, &keys);
    // Images a static delta may start from: the active one first; and
    // their dm-verity trees, whose hashes of the blocks a static delta
    // copies need not be computed again.
    let holders = [active_inst.as_ref(), standby_inst.as_ref().ok().and_then(Option::as_ref)];
    let held: Vec<(SlotId, Sha256Digest)> =
        holders.iter().flatten().map(|i| (i.slot, i.manifest.image.sha256)).collect();
    let trees: Vec<(SlotId, Verity)> =
        holders.iter().flatten().filter_map(|i| Some((i.slot, i.manifest.image.verity.clone()?))).collect();
    if opts.dry_run {
        return dry_run(&transport, &fetched, layout, &held);
    }
    release_slot(layout, standby, cfg.on_drain_timeout)?;

    // 3. Download unless the standby already holds exactly this image.
    // A standby whose manifest no longer verifies (a retired key, a damaged
    // file) holds nothing we can reuse: it is simply overwritten.
    let standby_inst = standby_inst.unwrap_or_else(|e| {
        tracing::info!("{}; the new image replaces it", Chain(&e));
        None
    });
    let mut download = DownloadStats::default();
    // If the standby already holds exactly this image, the file verified here
    // is the one mounted below (no second full read of the image).
    let mut verified_file = standby_inst.as_ref().filter(|i| i.manifest.image.sha256 == m.image.sha256).and_then(|i| {
        match open_verified(layout, standby, &i.manifest) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("{}; downloading it again", Chain(&e));
                None
            }
        }
    });
    if verified_file.is_none() {
        let (stats, file) = download_into(cfg, layout, &transport, &fetched, standby, &held, &trees)?;
        download = stats;
        verified_file = Some(file);
    } else {
        download.mode = TransferMode::None;
        // The standby already holds this image under an older record
        // (a reproducible rebuild republished): it now holds it as this serial.
        record_manifest(layout, standby, &fetched, None)?;
    }
    let inst = Installed { slot: standby, manifest: m.clone(), key_id: fetched.verified.key_id.clone() };

    // 4. Mount: the image was verified as it was written (or is verified now).
    ensure_mounted(cfg, layout, &inst, verified_file)?;
    let target = layout.mount_point(standby);
    // Until link points at it, any way out of here unmounts it again.
    let new_mount = MountGuard::new(&target);

    // 5. Health check.
    if let Some(cmd) = &cfg.health_check {
        run_hook("health_check", cmd, &target, &m, cfg.hook_timeout)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("serial {} not activated; the active version is unchanged", m.serial))?;
    }

    // 6. Switch.
    let switch_started = Instant::now();
    point_link(&cfg.link, &target)?;
    new_mount.keep();
    let switch_micros = switch_started.elapsed().as_micros() as u64;
    state.active = Some(standby);
    if state.rolled_back_serial.is_some_and(|s| m.serial > s) {
        state.rolled_back_serial = None;
    }
    state.raise_floor(&m, FloorReason::Installed);
    state.save(layout)?;
    tracing::info!("{} -> {} (serial {}, {})", cfg.link.display(), target.display(), m.serial, m.version);

    // 7. Post-switch hook, then drain the old slot.
    let hook_result = match &cfg.post_switch {
        Some(cmd) => run_hook("post_switch", cmd, &target, &m, cfg.hook_timeout),
        None => Ok(()),
    };
    let retired = match active {
        Some(old) => drain_slot(layout, old, cfg.drain_timeout, cfg.on_drain_timeout)?,
        None => Retired::default(),
    };
    hook_result.with_context(|| format!("switched to serial {}, but post_switch failed", m.serial))?;
    Ok(Outcome::Switched { serial: m.serial, version: m.version, slot: standby, download, retired, switch_micros })
}

/// Makes the verified download in `slot`'s partial file the slot's image.
/// The slot's previous image stays installed until this moment: its
/// manifest goes (the slot stops being installed) right before the new
/// image is renamed over it, and the new manifest is written last, so a
/// crash in between leaves an empty slot, never a manifest describing the
/// wrong image. The rename gives the new image a new inode: a loop device
/// still reading the old one (a detached old version) keeps its bytes.
fn install_verified(
    layout: &Layout,
    slot: SlotId,
    fetched: &crate::fetch::FetchedManifest,
    index: Option<&[u8]>,
) -> Result<()> {
    for p in [layout.manifest(slot), layout.signature(slot), layout.index(slot)] {
        remove_if_present(&p)?;
    }
    fsync_dir(&layout.slot_dir(slot))?;
    std::fs::rename(layout.partial(slot), layout.image(slot))?;
    // The partial's bookkeeping goes with it; a leftover would only cause a harmless re-hash.
    let _ = std::fs::remove_file(layout.partial_meta(slot));
    let _ = std::fs::remove_file(layout.static_delta(slot));
    fsync_dir(&layout.slot_dir(slot))?;
    record_manifest(layout, slot, fetched, index)
}

/// Writes `fetched` as `slot`'s signed manifest (and `index` as its chunk
/// index), for the image the slot holds. The old manifest goes first, so a
/// crash in between leaves the slot uninstalled, never holding a signature
/// that does not match its manifest.
fn record_manifest(
    layout: &Layout,
    slot: SlotId,
    fetched: &crate::fetch::FetchedManifest,
    index: Option<&[u8]>,
) -> Result<()> {
    if remove_if_present(&layout.manifest(slot))? {
        fsync_dir(&layout.slot_dir(slot))?;
    }
    if let Some(bytes) = index {
        write_atomic(&layout.index(slot), bytes, 0o600)?;
    }
    write_atomic(&layout.signature(slot), &fetched.signature, 0o600)?;
    write_atomic(&layout.manifest(slot), &fetched.bytes, 0o600)?;
    Ok(())
}

/// Removes `path`; true if it was there (absent is not an error).
fn remove_if_present(path: &std::path::Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("clearing {}", path.display())),
    }
}
