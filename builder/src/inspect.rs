//! `imgbuild inspect`: what a manifest or an image file says.
//!
//! For debugging and audits. A manifest is shown as written, with a reminder
//! that its signature was not checked; `imgbuild verify` does that.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
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

/// Inspects `path`, a manifest or an image.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = f.read(&mut magic)?;
    if n == 4 && &magic == b"hsqs" {
        return Ok(Inspection {
            manifest: None,
            superblock: Some(read_superblock(path)?),
            image: Some(path.display().to_string()),
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
    let image_path = path.parent().unwrap_or(Path::new(".")).join(&manifest.image.path);
    let (superblock, image) = if image_path.exists() {
        (Some(read_superblock(&image_path)?), Some(image_path.display().to_string()))
    } else {
        (None, None)
    };
    Ok(Inspection { manifest: Some(manifest), superblock, image })
}
