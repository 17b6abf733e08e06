//! Changing what a channel serves without rebuilding: `rollout` re-signs a
//! channel's manifest with a new percentage (same image, new serial), and
//! `promote` signs a manifest for another channel pointing at the very image
//! (same sha256, same chunk index) a source channel serves, so what was
//! tested is exactly what ships.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use imgdeploy_common::manifest::{validate_channel, Manifest, Timestamp};

use crate::pack::source_date_epoch;
use crate::publish::{current_manifest, sign_and_write, Repo};

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
    channel: &str,
    percent: u8,
    expires_in: Duration,
) -> Result<Resigned> {
    let key = crate::keygen::load_private_key(key_path)?;
    validate_channel(channel)?;
    if percent > 100 {
        bail!("--percent {percent} is not a percentage (0-100)");
    }
    let cur = current_manifest(repo, channel)?.ok_or_else(|| {
        anyhow!("channel `{channel}` has no manifest in {}; publish with `imgbuild build` first", repo.root().display())
    })?;
    let created = now()?;
    let m = Manifest {
        serial: cur.serial + 1,
        created,
        expires: created.plus(expires_in),
        rollout: (percent < 100).then_some(percent),
        ..cur
    };
    let (path, _) = sign_and_write(repo, &key, &m)?;
    Ok(Resigned { manifest: m, path })
}

/// Signs a manifest for `to` serving exactly what `from` serves.
pub fn promote(
    repo: &Repo,
    key_path: &std::path::Path,
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
    let src = current_manifest(repo, from)?
        .ok_or_else(|| anyhow!("channel `{from}` has no manifest in {}", repo.root().display()))?;
    let image = repo.root().join(&src.image.path);
    if !image.exists() {
        bail!("{} (served by `{from}`) is missing from the repository; cannot promote it", image.display());
    }
    let serial = current_manifest(repo, to)?.map(|m| m.serial).unwrap_or(0) + 1;
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
