//! `imgbuild inspect`: what a manifest or an image file says.
//!
//! For debugging and audits. A manifest is shown as written, with a reminder
//! that its signature was not checked; `imgbuild verify` does that.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use imgdeploy_common::blockmap::{BlockMap, KindSummary, MapSummary, MAX_MAP_BYTES};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::Manifest;
use imgdeploy_common::squashfs::{Superblock, SUPERBLOCK_BYTES};
use imgdeploy_common::MAX_MANIFEST_BYTES;

/// What was found.
#[derive(Debug, serde::Serialize)]
pub struct Inspection {
    /// The manifest, if the file is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
    /// The image's superblock (the file itself, or the manifest's image when it is beside it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub superblock: Option<Superblock>,
    /// The image file examined, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The block map's summary (`--blocks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<MapSummary>,
}

fn read_superblock(path: &Path) -> Result<Superblock> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut head = vec![0u8; SUPERBLOCK_BYTES];
    let n = f.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
    let sb = Superblock::parse(&head[..n]).with_context(|| format!("{}", path.display()))?;
    sb.check_size(len).with_context(|| format!("{}", path.display()))?;
    Ok(sb)
}

/// Reads and checks the block map `m` names, beside the manifest in `dir`.
fn read_map(dir: &Path, m: &Manifest) -> Result<BlockMap> {
    let r = m
        .block_map
        .as_ref()
        .context("this manifest names no block map (the image was built before block maps); rebuild it to get one")?;
    let path = dir.join(&r.path);
    let f = File::open(&path).with_context(|| format!("cannot open the block map {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_MAP_BYTES as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 == r.size && Sha256Digest::of_bytes(&bytes) == r.sha256,
        "{} is not the block map the manifest names (size or sha256 differ); restore it from the repository",
        path.display()
    );
    BlockMap::decode(&bytes).with_context(|| format!("{}", path.display()))
}

/// The `--blocks` summary as text.
pub fn describe_blocks(s: &MapSummary) -> String {
    let kind = |name: &str, k: &KindSummary| {
        format!(
            "  {name:<9} {:>8} blocks ({} stored), {} bytes on disk, {} uncompressed\n",
            k.blocks, k.stored, k.disk_bytes, k.raw_bytes
        )
    };
    format!(
        "block map: zstd {} level {} (metadata {}), {}-byte blocks\n{}{}{}  {} files ({} with a tail in a fragment block), {} sparse blocks, {} blocks repeat earlier content\n",
        s.zstd_version,
        s.level,
        s.metadata_level,
        s.block_size,
        kind("data", &s.data),
        kind("fragment", &s.fragment),
        kind("metadata", &s.metadata),
        s.files,
        s.files_with_tail,
        s.sparse_blocks,
        s.duplicate_blocks
    )
}

/// Inspects `path`, a manifest or an image; with `blocks`, also the
/// manifest's block map.
pub fn inspect(path: &Path, blocks: bool) -> Result<Inspection> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = f.read(&mut magic)?;
    if n == 4 && &magic == b"hsqs" {
        anyhow::ensure!(
            !blocks,
            "--blocks needs the manifest, which names the image's block map; give the manifest instead of {}",
            path.display()
        );
        return Ok(Inspection {
            manifest: None,
            superblock: Some(read_superblock(path)?),
            image: Some(path.display().to_string()),
            blocks: None,
        });
    }
    let len = f.metadata()?.len();
    anyhow::ensure!(
        len <= MAX_MANIFEST_BYTES,
        "{} is neither a squashfs image nor a manifest (too large)",
        path.display()
    );
    let bytes = std::fs::read(path)?;
    let manifest = Manifest::parse(&bytes)
        .with_context(|| format!("{} is neither a squashfs image nor a valid manifest", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let image_path = dir.join(&manifest.image.path);
    let (superblock, image) = if image_path.exists() {
        (Some(read_superblock(&image_path)?), Some(image_path.display().to_string()))
    } else {
        (None, None)
    };
    let blocks = if blocks { Some(read_map(dir, &manifest)?.summary()) } else { None };
    Ok(Inspection { manifest: Some(manifest), superblock, image, blocks })
}
