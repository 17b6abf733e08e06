//! `imgbuild gc`: remove images, chunk indexes, block maps, static deltas and
//! `sigs/` signatures no channel references, beyond the newest N of each.
//!
//! Referenced files are never removed. A static delta's `from` image and its
//! block map count as referenced: the next build makes its deltas from them. Of the unreferenced ones, the N most
//! recently published stay, so frontends still downloading (or rolling back
//! to) a recent image are not cut off. Leftover temp files of crashed builds
//! older than a day go too. If any manifest cannot be read, nothing is removed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use imgdeploy_common::blockmap::MAPS_DIR;
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::{
    image_path, signature_path, DELTAS_DIR, IMAGES_DIR, IMAGE_SUFFIX, INDEXES_DIR, SIGS_DIR,
};

use crate::publish::Repo;

/// What gc did.
#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Files kept because a channel references them.
    pub referenced: Vec<PathBuf>,
    /// Unreferenced files kept by --keep.
    pub kept: Vec<PathBuf>,
    /// Files removed.
    pub removed: Vec<PathBuf>,
    /// Bytes freed.
    pub freed_bytes: u64,
}

/// Prunes one content-addressed directory.
fn prune(
    dir: &Path,
    suffix: &str,
    referenced: &BTreeSet<PathBuf>,
    keep: usize,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<()> {
    let mut unreferenced = Vec::new();
    let mut stale_tmp = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let md = entry.metadata().with_context(|| format!("examining {}", path.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with(".tmp-") {
            if SystemTime::now().duration_since(mtime).unwrap_or_default() > Duration::from_secs(86400) {
                stale_tmp.push((path, md.len()));
            }
        } else if name.ends_with(suffix) {
            if referenced.contains(&path) {
                report.referenced.push(path);
            } else {
                unreferenced.push((mtime, path, md.len()));
            }
        }
    }
    // Newest first; ties broken by name so the choice is deterministic.
    unreferenced.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut doomed = stale_tmp;
    for (i, (_, p, len)) in unreferenced.into_iter().enumerate() {
        if i < keep {
            report.kept.push(p);
        } else {
            doomed.push((p, len));
        }
    }
    for (path, len) in doomed {
        if !dry_run {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        report.freed_bytes += len;
        report.removed.push(path);
    }
    if !dry_run {
        imgdeploy_common::atomic::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// Runs gc on `repo`, keeping `keep` unreferenced images and indexes.
pub fn gc(repo: &Repo, keep: usize, dry_run: bool) -> Result<GcReport> {
    // A publish in progress has stored an image no manifest names yet.
    let _lock = repo.lock()?;
    let manifests = repo.manifests()?;
    let froms = || manifests.iter().flat_map(|(_, m)| &m.deltas);
    let images: BTreeSet<PathBuf> = manifests
        .iter()
        .map(|(_, m)| repo.root().join(&m.image.path))
        .chain(froms().map(|d| repo.root().join(image_path(&d.from))))
        .collect();
    let indexes: BTreeSet<PathBuf> =
        manifests.iter().filter_map(|(_, m)| m.index.as_ref()).map(|i| repo.root().join(&i.path)).collect();
    let mut report = GcReport::default();
    prune(&repo.root().join(IMAGES_DIR), IMAGE_SUFFIX, &images, keep, dry_run, &mut report)?;
    prune(&repo.root().join(INDEXES_DIR), ".idx", &indexes, keep, dry_run, &mut report)?;
    let maps: BTreeSet<PathBuf> = manifests
        .iter()
        .filter_map(|(_, m)| m.block_map.as_ref())
        .chain(froms().map(|d| &d.from_map))
        .map(|b| repo.root().join(&b.path))
        .collect();
    prune(&repo.root().join(MAPS_DIR), ".map", &maps, keep, dry_run, &mut report)?;
    let deltas: BTreeSet<PathBuf> = froms().map(|d| repo.root().join(&d.path)).collect();
    prune(&repo.root().join(DELTAS_DIR), ".delta", &deltas, keep, dry_run, &mut report)?;
    let sigs: BTreeSet<PathBuf> = manifests
        .iter()
        .map(|(path, _)| {
            let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(repo.root().join(signature_path(&Sha256Digest::of_bytes(&bytes))))
        })
        .collect::<Result<_>>()?;
    prune(&repo.root().join(SIGS_DIR), ".sig", &sigs, keep, dry_run, &mut report)?;
    Ok(report)
}
