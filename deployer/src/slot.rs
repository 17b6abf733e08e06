//! Installed slots: reading a slot's signed manifest back (re-verifying its
//! signature every time), and opening its image only after its size, sha256
//! and superblock check out, through the same file descriptor the loop
//! device will read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::{HeaderError, Manifest};
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::trust::{verify_signed, TrustError};

use anyhow::Context;

use crate::config::Config;
use crate::mount::{mount_image, mounted_at, VerityRequest};
use crate::state::{Layout, SlotId};

/// Why a slot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The stored manifest no longer verifies.
    #[error("slot {slot}: its stored manifest does not verify; run `imgdeploy apply` to reinstall it")]
    Manifest {
        /// The slot.
        slot: SlotId,
        /// Why.
        #[source]
        source: TrustError,
    },
    /// The image does not match its manifest.
    #[error("slot {slot}: image {path} is not the signed image; the file was corrupted or modified on disk; `imgdeploy repair` rebuilds the active slot from its good chunks and the origin")]
    Image {
        /// The slot.
        slot: SlotId,
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        problem: ImageCheck,
    },
    /// I/O error.
    #[error("slot {slot}: cannot read {path}")]
    Io {
        /// The slot.
        slot: SlotId,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A slot holding a verified manifest.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Which slot.
    pub slot: SlotId,
    /// Its manifest.
    pub manifest: Manifest,
    /// The key that signed it.
    pub key_id: String,
}

/// The slot's installed manifest, re-verified; `None` if the slot is empty.
pub fn installed(layout: &Layout, slot: SlotId, keys: &[PublicKey]) -> Result<Option<Installed>, SlotError> {
    let io = |path: PathBuf| move |source| SlotError::Io { slot, path, source };
    let mpath = layout.manifest(slot);
    let bytes = match std::fs::read(&mpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(mpath)(e)),
    };
    let spath = layout.signature(slot);
    let sig = std::fs::read(&spath).map_err(io(spath))?;
    let v = verify_signed(&bytes, &sig, keys).map_err(|source| SlotError::Manifest { slot, source })?;
    Ok(Some(Installed { slot, manifest: v.manifest, key_id: v.key_id }))
}

/// Why an image file does not match its manifest.
#[derive(Debug, thiserror::Error)]
pub enum ImageCheck {
    /// Reading failed.
    #[error("cannot be read")]
    Io(#[from] std::io::Error),
    /// Its size is not the signed one.
    #[error("is {found} bytes, its manifest says {expected}")]
    Size {
        /// Signed.
        expected: u64,
        /// On disk.
        found: u64,
    },
    /// Its contents are not the signed ones.
    #[error("has sha256 {found}, its manifest says {expected}")]
    Digest {
        /// Signed.
        expected: Sha256Digest,
        /// On disk.
        found: Sha256Digest,
    },
    /// Its header is unusable or disagrees with its size.
    #[error(transparent)]
    Header(HeaderError),
}

/// Checks an open image against `manifest`: size, sha256, then the superblock.
/// Leaves the file positioned anywhere; the loop device does not care.
pub fn check_image(f: &mut File, manifest: &Manifest) -> Result<(), ImageCheck> {
    let len = f.metadata()?.len();
    if len != manifest.image.size {
        return Err(ImageCheck::Size { expected: manifest.image.size, found: len });
    }
    f.seek(SeekFrom::Start(0))?;
    let (sha, n) = Sha256Digest::of_reader((&*f).take(len + 1))?;
    if n != len {
        return Err(ImageCheck::Size { expected: manifest.image.size, found: n });
    }
    if sha != manifest.image.sha256 {
        return Err(ImageCheck::Digest { expected: manifest.image.sha256, found: sha });
    }
    manifest.image.format.check_header(f, len).map_err(ImageCheck::Header)
}

/// Opens the slot's image and checks size, sha256 and superblock against
/// `manifest`. The returned file is the one to hand to the loop device.
pub fn open_verified(layout: &Layout, slot: SlotId, manifest: &Manifest) -> Result<File, SlotError> {
    let path = layout.image(slot);
    let mut f = File::open(&path).map_err(|source| SlotError::Io { slot, path: path.clone(), source })?;
    match check_image(&mut f, manifest) {
        Ok(()) => Ok(f),
        Err(ImageCheck::Io(source)) => Err(SlotError::Io { slot, path, source }),
        Err(problem) => Err(SlotError::Image { slot, path, problem }),
    }
}
/// Mounts `slot` unless it is already mounted. Its image is verified first,
/// unless `verified` is the open image file whose sha256 was just computed
/// over exactly the bytes written to it (a download in this run); then only
/// its superblock is checked.
pub fn ensure_mounted(cfg: &Config, layout: &Layout, inst: &Installed, verified: Option<File>) -> anyhow::Result<()> {
    let target = layout.mount_point(inst.slot);
    let tag = crate::integrity::instance_tag(&layout.root);
    match crate::integrity::remove_stale(&tag) {
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot look for stale dm-verity devices: {e}"),
    }
    if mounted_at(&target)?.is_some() {
        return Ok(());
    }
    let file = match verified {
        Some(f) => {
            inst.manifest
                .image
                .format
                .check_header(&f, inst.manifest.image.size)
                .with_context(|| format!("slot {}: image {}", inst.slot, layout.image(inst.slot).display()))?;
            f
        }
        None => open_verified(layout, inst.slot, &inst.manifest)?,
    };
    let integrity = mount_image(
        &file,
        inst.manifest.image.format,
        &layout.image(inst.slot),
        &target,
        cfg.mount_options,
        &format!("imgdeploy:{}:{}", inst.slot, inst.manifest.serial),
        Some(VerityRequest {
            tag: &tag,
            slot: inst.slot.name(),
            serial: inst.manifest.serial,
            tree: inst.manifest.image.verity.as_ref(),
            required: cfg.require_verity,
        }),
    )
    .with_context(|| format!("slot {}", inst.slot))?;
    tracing::info!(
        "mounted slot {} (serial {}) at {} ({})",
        inst.slot,
        inst.manifest.serial,
        target.display(),
        integrity.describe()
    );
    Ok(())
}
