//! `imgbuild verify`: check a published manifest the way a deployer would:
//! signature, expiry, then the image's size and sha256 (streamed, bounded by
//! the signed size), from a local path or an http(s) URL.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use imgdeploy_common::digest::HashingReader;
use imgdeploy_common::location::{Location, SignedManifest};
use imgdeploy_common::manifest::{Manifest, Timestamp};
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::squashfs::{Superblock, SUPERBLOCK_BYTES};
use imgdeploy_common::transport::{PrivateOrigin, Transport};
use imgdeploy_common::trust::verify_signed;
use imgdeploy_common::SIGNATURE_BYTES;

/// A verified publication.
#[derive(Debug, serde::Serialize)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// Where the image was read.
    pub image: String,
    /// Id of the key that signed the manifest.
    pub key_id: String,
    /// The image's superblock.
    pub superblock: Superblock,
}

/// Verifies the manifest at `source` (reached with `origin`'s credentials) with `keys`.
pub fn verify(source: &str, keys: &[PublicKey], origin: &PrivateOrigin) -> Result<Verified> {
    let transport = Transport::new(origin, Duration::from_secs(60), Duration::from_secs(4 * 3600))?;
    let loc = Location::parse(source);
    let SignedManifest { verified: v, bytes, signature: sig, .. } =
        loc.fetch_verified_manifest(&transport, keys, Timestamp::now())?;
    // The channel's `.sig` must match too: openssl users and frontends
    // reading a repository without `sigs/` check that one.
    let channel_sig = loc.with_suffix(".sig");
    match channel_sig.read_bounded(&transport, SIGNATURE_BYTES as u64) {
        Ok(s) if s != sig => {
            verify_signed(&bytes, &s, keys).with_context(|| {
                format!("{channel_sig} (manifest {loc}); republish the channel so both signatures match")
            })?;
        }
        Ok(_) => {}
        Err(e) if e.is_absent() => {}
        Err(e) => return Err(e.into()),
    }
    let m = v.manifest;
    let img = loc.sibling(&m.image.path);
    let (reader, _) = img.open(&transport, 0)?;
    // Read at most one byte past the signed size, so an endless or padded body is caught.
    let mut hashing = HashingReader::new(reader.take(m.image.size + 1));
    let mut head = vec![0u8; SUPERBLOCK_BYTES];
    hashing
        .read_exact(&mut head)
        .map_err(|e| img.read_error(e))
        .with_context(|| format!("image {img} is shorter than a superblock"))?;
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| img.read_error(e))?;
    let (sha, size) = hashing.finish();
    if size != m.image.size {
        bail!("image {img} is {}{size} bytes but the manifest signs {}; the upload is incomplete or the file was replaced", if size > m.image.size { "more than " } else { "" }, m.image.size);
    }
    if sha != m.image.sha256 {
        bail!(
            "image {img} has sha256 {sha} but the manifest signs {}; the image was corrupted or tampered with",
            m.image.sha256
        );
    }
    let superblock = Superblock::parse(&head).with_context(|| format!("image {img}"))?;
    Ok(Verified { manifest: m, image: img.to_string(), key_id: v.key_id, superblock })
}
