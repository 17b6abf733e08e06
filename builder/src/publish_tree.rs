//! `imgbuild build`: read the tree, write the image, publish it. Every check
//! that can fail cheaply (key, channel, repository, serial) runs before the
//! expensive compression, and nothing reaches the repository's public names
//! unless the whole build succeeded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use imgdeploy_common::manifest::{validate_channel, validate_version, Timestamp};
use indicatif::{ProgressBar, ProgressStyle};

use imgdeploy_common::compress::Compressor;
use imgdeploy_common::verity::Verity;

use crate::blocks::{ReuseIndex, ReuseStats};
use crate::image::{write_image, ImageOptions};
use crate::keygen::load_private_key;
use crate::publish::{
    check_not_expired, earlier_images, next_serial, publish_manifest, signer_and, store_image, Published, Release, Repo,
};
use crate::tree::{compile_excludes, read_tree};

/// Everything `build` needs.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Tree to pack.
    pub src: PathBuf,
    /// Private key file.
    pub key: PathBuf,
    /// Other public keys whose signature on the repository's current
    /// manifest is accepted (after a key rotation); the signing key's own is always.
    pub trust: Vec<imgdeploy_common::sign::PublicKey>,
    /// Channel.
    pub channel: String,
    /// Repository directory.
    pub repo: PathBuf,
    /// Version label.
    pub version: Option<String>,
    /// Explicit serial.
    pub serial: Option<u64>,
    /// zstd level.
    pub level: u32,
    /// Exclude globs.
    pub exclude: Vec<String>,
    /// Manifest validity.
    pub expires_in: Duration,
    /// Compression threads (0 = all cores).
    pub jobs: u32,
    /// Pack file tails into shared fragment blocks.
    pub fragments: bool,
    /// Start every file's data at a 4 KiB boundary ([`ImageOptions::align`]).
    pub align: bool,
    /// Staged rollout percentage.
    pub rollout: Option<u8>,
    /// Copy the compressed blocks of the images the repository's channels
    /// serve instead of compressing their content again.
    pub reuse: bool,
    /// Static deltas to make, from the channel's last this many images.
    pub deltas: usize,
}

/// The result of a build.
#[derive(Debug, serde::Serialize)]
pub struct BuildReport {
    /// What was published.
    #[serde(flatten)]
    pub published: Published,
    /// Inodes in the image.
    pub inodes: u32,
    /// Regular-file bytes packed.
    pub data_bytes: u64,
    /// Blocks copied from earlier images and blocks compressed.
    #[serde(flatten)]
    pub reuse: ReuseStats,
    /// Bytes of the dm-verity superblock and hash tree appended.
    pub verity_bytes: u64,
    /// Milliseconds spent computing and writing them.
    pub verity_ms: u64,
    /// The static deltas published with the image.
    pub deltas: Vec<crate::deltas::DeltaReport>,
    /// Milliseconds spent making and checking them.
    pub deltas_ms: u64,
}

/// Removes a temp file unless it was committed.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: the file may already have been renamed away (committed).
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `SOURCE_DATE_EPOCH`, if set, for reproducible builds.
pub fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => {
            Ok(Some(s.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH=`{s}` is not a number of seconds"))?))
        }
        Err(_) => Ok(None),
    }
}

fn progress_bar(total: u64) -> ProgressBar {
    // indicatif draws nothing when stderr is not a terminal.
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} packing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// Runs a build.
pub fn build(req: &BuildRequest) -> Result<BuildReport> {
    let key = load_private_key(&req.key)?;
    validate_channel(&req.channel)?;
    if let Some(v) = &req.version {
        validate_version(v)?;
    }
    let excludes = compile_excludes(&req.exclude)?;
    let repo = Repo::open(&req.repo)?;
    let epoch = source_date_epoch()?;
    let created = epoch.map(Timestamp).unwrap_or_else(Timestamp::now);
    let release = Release {
        channel: &req.channel,
        version: req.version.as_deref(),
        serial: req.serial,
        created,
        expires_in: req.expires_in,
        rollout: req.rollout,
    };
    let trusted = signer_and(&key, &req.trust);
    // Fail fast, before minutes of packing; both are checked again under the lock.
    next_serial(&repo, &release, &trusted)?;
    check_not_expired(&req.channel, created.plus(req.expires_in))?;

    tracing::info!("reading {}", req.src.display());
    let tree = read_tree(&req.src, &excludes)?;
    tracing::info!("{} entries, {} bytes of file data", tree.nodes.len(), tree.data_bytes);

    // libsquashfs creates the file itself (O_EXCL), so only pick a fresh name.
    let tmp = TempFile(repo.images_dir().join(format!(
        ".tmp-{}-{}.squashfs",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    )));
    let jobs = if req.jobs == 0 {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
    } else {
        req.jobs
    };
    let opts = ImageOptions {
        level: req.level,
        workers: jobs,
        mtime: epoch.map(|e| e.min(u32::MAX as u64) as u32),
        fragments: req.fragments,
        align: req.align,
    };
    let sources = if req.reuse { earlier_images(&repo, &trusted) } else { Vec::new() };
    let reuse = ReuseIndex::new(sources, Compressor::identity(req.level));
    if !reuse.is_empty() {
        tracing::info!("{} distinct blocks of earlier images can be reused", reuse.len());
    }
    let pb = progress_bar(tree.data_bytes);
    let stats = write_image(&tree, &tmp.0, &opts, reuse, &|n| pb.inc(n))
        .with_context(|| format!("packing {}", req.src.display()))?;
    pb.finish_and_clear();
    let tree_started = std::time::Instant::now();
    let verity = append_verity(&tmp.0)?;
    let verity_ms = tree_started.elapsed().as_millis() as u64;
    let tree_offset = verity.hash_offset;

    // From storing the image (which `gc` must not remove before a manifest
    // names it) to signing the manifest.
    let _lock = repo.lock()?;
    let stored = store_image(&repo, &tmp.0, &stats.map, Some(verity))?;
    let serial = next_serial(&repo, &release, &trusted)?;
    let deltas_started = std::time::Instant::now();
    let bases = crate::deltas::bases_for(&repo, &req.channel, &trusted, req.deltas);
    let (delta_refs, delta_reports): (Vec<_>, Vec<_>) =
        crate::deltas::publish(&repo, &bases, &stored, &stats.map)?.into_iter().unzip();
    let deltas_ms = deltas_started.elapsed().as_millis() as u64;
    let published = publish_manifest(&repo, &key, &release, serial, &stored, delta_refs)?;
    let verity_bytes = published.size - tree_offset;
    tracing::info!("dm-verity hash tree: {verity_bytes} bytes in {verity_ms} ms");
    Ok(BuildReport {
        published,
        inodes: stats.inodes,
        data_bytes: stats.data_bytes,
        reuse: stats.reuse,
        verity_bytes,
        verity_ms,
        deltas: delta_reports,
        deltas_ms,
    })
}

/// Appends the dm-verity superblock and hash tree to the packed image and
/// makes them durable, so that every block a frontend reads can be checked
/// against the root hash the manifest signs.
fn append_verity(image: &Path) -> Result<Verity> {
    let what = || format!("appending the dm-verity hash tree to {}", image.display());
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(image).with_context(what)?;
    let verity = imgdeploy_common::verity::append_tree(&mut file).with_context(what)?;
    file.sync_all().with_context(what)?;
    Ok(verity)
}

/// For messages: a path relative to the current directory when shorter.
pub fn short(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.display().to_string())
}
