//! The atomic switch: `link` is repointed by creating a temporary symlink
//! beside it and `rename(2)`-ing it over `link`, then fsyncing the directory.
//! Readers resolving paths through `link` see the old target or the new one,
//! never a missing link.

use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use imgdeploy_common::atomic::{create_dir_all_durable, fsync_dir, parent_dir};

use crate::config::Config;
use crate::state::{Layout, SlotId};

/// Why the switch failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// `link` exists and is not a symlink.
    #[error("{0} exists and is not a symlink; move it away so imgdeploy can manage it (e.g. `mv {0} {0}.orig`)")]
    NotASymlink(PathBuf),
    /// The filesystem refused, or the link's directory is unsafe.
    #[error("cannot repoint {link}")]
    Io {
        /// The link.
        link: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Opens the state directory and reads which slot `link` points at.
pub fn active_slot(cfg: &Config, layout: &Layout) -> Result<Option<SlotId>> {
    match current_target(&cfg.link)? {
        None => Ok(None),
        Some(t) => layout.slot_of_target(&t).map(Some).ok_or_else(|| {
            anyhow!(
                "{} points at {}, which imgdeploy does not manage; remove the link (imgdeploy recreates it) or choose another `link`",
                cfg.link.display(),
                t.display()
            )
        }),
    }
}

/// Where `link` points now, if it is a symlink.
pub fn current_target(link: &Path) -> Result<Option<PathBuf>, SwitchError> {
    match link.symlink_metadata() {
        Ok(md) if md.file_type().is_symlink() => {
            std::fs::read_link(link).map(Some).map_err(|source| SwitchError::Io { link: link.to_owned(), source })
        }
        Ok(_) => Err(SwitchError::NotASymlink(link.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SwitchError::Io { link: link.to_owned(), source }),
    }
}

/// Atomically points `link` at `target`.
pub fn point_link(link: &Path, target: &Path) -> Result<(), SwitchError> {
    current_target(link)?;
    let err = |source| SwitchError::Io { link: link.to_owned(), source };
    let dir = parent_dir(link);
    create_dir_all_durable(&dir, 0o755).map_err(err)?;
    crate::safety::check_dir(&dir, "the directory of link").map_err(|e| err(io::Error::other(e)))?;
    let real = std::fs::canonicalize(&dir).map_err(err)?;
    crate::safety::check_trusted_ancestors(&real, "the directory of link").map_err(|e| err(io::Error::other(e)))?;
    let name = link.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.tmp-");
    // Temp links left by runs killed between symlink(2) and rename(2) are ours: remove them.
    for entry in std::fs::read_dir(&dir).map_err(err)?.flatten() {
        let stale =
            entry.file_name().to_string_lossy().starts_with(&prefix) && entry.file_type().is_ok_and(|t| t.is_symlink());
        if stale {
            std::fs::remove_file(entry.path()).map_err(err)?;
        }
    }
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    symlink(target, &tmp).map_err(err)?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        // Do not leave the temp link behind; the rename error is what matters.
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    fsync_dir(&dir).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repoints_and_refuses_real_directories() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("web/cgi");
        point_link(&link, Path::new("/a")).unwrap();
        assert_eq!(current_target(&link).unwrap(), Some(PathBuf::from("/a")));
        point_link(&link, Path::new("/b")).unwrap();
        assert_eq!(current_target(&link).unwrap(), Some(PathBuf::from("/b")));
        assert_eq!(std::fs::read_dir(d.path().join("web")).unwrap().count(), 1, "temp link left behind");
        // A temp link left by a killed run is cleaned up by the next switch.
        symlink("/x", d.path().join("web/.cgi.tmp-999999")).unwrap();
        point_link(&link, Path::new("/c")).unwrap();
        assert_eq!(std::fs::read_dir(d.path().join("web")).unwrap().count(), 1, "stale temp link kept");
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        assert!(matches!(point_link(&real, Path::new("/a")), Err(SwitchError::NotASymlink(_))));
        assert!(real.is_dir());
    }
}
