//! Changing what a channel serves without rebuilding: `rollout` re-signs a
//! channel's manifest with a new percentage (same image, new serial),
//! `refresh` re-signs it with a new expiry only, and
//! `promote` signs a manifest for another channel pointing at the very image
//! (same sha256, same chunk index) a source channel serves, so what was
//! tested is exactly what ships.
//!
//! Both re-sign only what the signing key signed: a repository manifest is
//! used only when its signature verifies with that key, and its image and
//! chunk index only when they hash to what it signs. CI often downloads the
//! repository from the bucket it publishes to; whoever can write there must
//! not choose what CI signs.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use imgdeploy_common::manifest::{validate_channel, Manifest, Timestamp};
use imgdeploy_common::sign::PublicKey;

use crate::publish::{current_manifest, following_serial, sign_and_write, signer_and, verify_stored, Repo};
use crate::publish_tree::source_date_epoch;

/// What was signed.
#[derive(Debug, serde::Serialize)]
pub struct Resigned {
    /// The new manifest.
    pub manifest: Manifest,
    /// Where it was written.
    pub path: std::path::PathBuf,
}

fn now() -> Result<Timestamp> {
    Ok(source_date_epoch()?.map(Timestamp).unwrap_or_else(Timestamp::now))
}

/// Re-signs `channel` with rollout `percent` (100 = everyone).
pub fn rollout(
    repo: &Repo,
    key_path: &std::path::Path,
    also_trusted: &[PublicKey],
    channel: &str,
    percent: u8,
    expires_in: Duration,
) -> Result<Resigned> {
    if percent > 100 {
        bail!("--percent {percent} is not a percentage (0-100)");
    }
    resign(repo, key_path, also_trusted, channel, expires_in, |_| (percent < 100).then_some(percent))
}

/// Re-signs `channel` unchanged but for a new expiry and the next serial:
/// meant for a CI schedule, so that manifests can expire soon (a mirror
/// that keeps serving an old manifest can hold hosts back only until it
/// expires) without anyone having to publish.
pub fn refresh(
    repo: &Repo,
    key_path: &std::path::Path,
    also_trusted: &[PublicKey],
    channel: &str,
    expires_in: Duration,
) -> Result<Resigned> {
    resign(repo, key_path, also_trusted, channel, expires_in, |cur| cur.rollout)
}

/// Signs the channel's current manifest again with the next serial, a new
/// expiry and the rollout `rollout` picks, after checking that the current
/// manifest and its image are what the signing key signed.
fn resign(
    repo: &Repo,
    key_path: &std::path::Path,
    also_trusted: &[PublicKey],
    channel: &str,
    expires_in: Duration,
    rollout: impl FnOnce(&Manifest) -> Option<u8>,
) -> Result<Resigned> {
    let key = crate::keygen::load_private_key(key_path)?;
    validate_channel(channel)?;
    let trusted = signer_and(&key, also_trusted);
    let _lock = repo.lock()?;
    let cur = current_manifest(repo, channel, &trusted)?.ok_or_else(|| {
        anyhow!("channel `{channel}` has no manifest in {}; publish with `imgbuild build` first", repo.root().display())
    })?;
    verify_stored(repo, &cur)?;
    let created = now()?;
    let m = Manifest {
        serial: following_serial(channel, cur.serial)?,
        created,
        expires: created.plus(expires_in),
        rollout: rollout(&cur),
        ..cur
    };
    let (path, _) = sign_and_write(repo, &key, &m)?;
    Ok(Resigned { manifest: m, path })
}

/// Signs a manifest for `to` serving exactly what `from` serves.
#[allow(clippy::too_many_arguments)]
pub fn promote(
    repo: &Repo,
    key_path: &std::path::Path,
    also_trusted: &[PublicKey],
    from: &str,
    to: &str,
    percent: Option<u8>,
    expires_in: Duration,
) -> Result<Resigned> {
    let key = crate::keygen::load_private_key(key_path)?;
    validate_channel(from)?;
    validate_channel(to)?;
    if from == to {
        bail!("--from and --to are both `{from}`; use `imgbuild rollout` to change a channel in place");
    }
    if percent.is_some_and(|p| p > 100) {
        bail!("--percent must be 0-100");
    }
    let trusted = signer_and(&key, also_trusted);
    let _lock = repo.lock()?;
    let src = current_manifest(repo, from, &trusted)?
        .ok_or_else(|| anyhow!("channel `{from}` has no manifest in {}", repo.root().display()))?;
    // What was tested is what ships: the very image `from` signs (its bytes
    // are checked too when the local copy has them).
    verify_stored(repo, &src)?;
    let serial = following_serial(to, current_manifest(repo, to, &trusted)?.map(|m| m.serial).unwrap_or(0))?;
    let created = now()?;
    let m = Manifest {
        channel: to.to_owned(),
        serial,
        created,
        expires: created.plus(expires_in),
        rollout: percent.filter(|&p| p < 100),
        ..src
    };
    let (path, _) = sign_and_write(repo, &key, &m)?;
    Ok(Resigned { manifest: m, path })
}
