//! `imgbuild gc`: remove images no channel references, beyond the newest N.
//!
//! Referenced images are never removed. Of the unreferenced ones, the N most
//! recently published stay, so frontends still downloading (or rolling back
//! to) a recent image are not cut off. Leftover temp files of crashed builds
//! older than a day go too. If any manifest cannot be read, nothing is removed.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use imgdeploy_common::manifest::IMAGE_SUFFIX;

use crate::publish::Repo;

/// What gc did.
#[derive(Debug, serde::Serialize)]
pub struct GcReport {
    /// Images kept because a channel references them.
    pub referenced: Vec<PathBuf>,
    /// Unreferenced images kept by --keep.
    pub kept: Vec<PathBuf>,
    /// Files removed.
    pub removed: Vec<PathBuf>,
    /// Bytes freed.
    pub freed_bytes: u64,
}

/// Runs gc on `repo`, keeping `keep` unreferenced images.
pub fn gc(repo: &Repo, keep: usize, dry_run: bool) -> Result<GcReport> {
    let referenced: BTreeSet<PathBuf> =
        repo.manifests()?.into_iter().map(|(_, m)| repo.root().join(&m.image.path)).collect();
    let mut unreferenced = Vec::new();
    let mut stale_tmp = Vec::new();
    let dir = repo.images_dir();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let md = entry.metadata().with_context(|| format!("examining {}", path.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with(".tmp-") {
            let age = SystemTime::now().duration_since(mtime).unwrap_or_default();
            if age > Duration::from_secs(86400) {
                stale_tmp.push((path, md.len()));
            }
        } else if name.ends_with(IMAGE_SUFFIX) && !referenced.contains(&path) {
            unreferenced.push((mtime, path, md.len()));
        }
    }
    // Newest first; ties broken by name so the choice is deterministic.
    unreferenced.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut report = GcReport {
        referenced: referenced.into_iter().collect(),
        kept: Vec::new(),
        removed: Vec::new(),
        freed_bytes: 0,
    };
    let doomed = unreferenced.into_iter().enumerate().filter_map(|(i, (_, p, len))| {
        if i < keep {
            report.kept.push(p);
            None
        } else {
            Some((p, len))
        }
    });
    let doomed: Vec<_> = doomed.chain(stale_tmp).collect();
    for (path, len) in doomed {
        if !dry_run {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        report.freed_bytes += len;
        report.removed.push(path);
    }
    if !dry_run {
        imgdeploy_common::atomic::fsync_dir(&dir).with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(report)
}
