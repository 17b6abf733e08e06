//! `imgbuild keygen`: a new Ed25519 key pair in openssl's formats.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgdeploy_common::atomic::create_new;
use imgdeploy_common::sign::PrivateKey;

/// `PREFIX.key` and `PREFIX.pub`.
pub fn key_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = prefix.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".key"), with(".pub"))
}

/// Writes `PREFIX.key` (PKCS#8 PEM, mode 0600) and `PREFIX.pub` (SPKI PEM,
/// mode 0644); refuses if either exists.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let (key_path, pub_path) = key_paths(prefix);
    for p in [&key_path, &pub_path] {
        if p.symlink_metadata().is_ok() {
            bail!("{} already exists; refusing to overwrite a key (choose another --out or remove it)", p.display());
        }
    }
    let key = PrivateKey::generate().context("reading the system's random source")?;
    let public = key.public();
    create_new(&key_path, key.to_pem()?.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", key_path.display()))?;
    create_new(&pub_path, public.to_pem()?.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", pub_path.display()))?;
    Ok((key_path, pub_path, public.id()))
}

/// Reads a private key, warning when other users can read it.
pub fn load_private_key(path: &Path) -> Result<PrivateKey> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => anyhow::anyhow!(
            "key file {} does not exist; create one with `imgbuild keygen --out PREFIX`",
            path.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot read key file {}", path.display())),
    })?;
    if md.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "private key {} is readable by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            md.permissions().mode() & 0o777,
            path.display()
        );
    }
    Ok(PrivateKey::read(path)?)
}
