//! Refusing directories a local attacker could tamper with. The state
//! directory holds the images the kernel mounts and `link`'s directory holds
//! the switch; if another user could write to either, or swap one for a
//! symlink, they could redirect what gets mounted or served.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Why a directory is unsafe.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeDir {
    /// It cannot be examined (only a missing directory is fine: it is created safely).
    #[error("cannot examine {what} {path}; fix its permissions or point the config elsewhere")]
    Unreadable {
        /// state_dir or link directory.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A symlink where a directory belongs.
    #[error("{what} {path} is a symlink; imgdeploy only works in real directories (a local user could redirect it): point the config at the real path")]
    Symlink {
        /// state_dir or link directory.
        what: &'static str,
        /// The path.
        path: String,
    },
    /// Owned by another user.
    #[error("{what} {path} is owned by uid {uid}, not by the user imgdeploy runs as ({me}); `chown {me} {path}`")]
    Owner {
        /// state_dir or link directory.
        what: &'static str,
        /// The path.
        path: String,
        /// Its owner.
        uid: u32,
        /// Our uid.
        me: u32,
    },
    /// A directory above it is owned by another user.
    #[error("{what}: the directory {path} above it is owned by uid {uid}; a directory above anything imgdeploy trusts must be root's (`chown root {path}`)")]
    ParentOwner {
        /// What was checked.
        what: &'static str,
        /// The directory.
        path: String,
        /// Its owner.
        uid: u32,
    },
    /// A directory above it is writable by others (and not sticky).
    #[error(
        "{what}: the directory {path} above it is writable by other users (mode {mode:o}); run `chmod go-w {path}`"
    )]
    ParentWritable {
        /// What was checked.
        what: &'static str,
        /// The directory.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// Writable by others.
    #[error("{what} {path} is writable by other users (mode {mode:o}); run `chmod go-w {path}`")]
    Writable {
        /// state_dir or link directory.
        what: &'static str,
        /// The path.
        path: String,
        /// Its mode.
        mode: u32,
    },
}

/// Checks that `dir` (if it exists) is a real directory owned by us and not
/// writable by group or others. A directory that does not exist is fine (it
/// is created safely); one that cannot be examined is not.
pub fn check_dir(dir: &Path, what: &'static str) -> Result<(), UnsafeDir> {
    let path = dir.display().to_string();
    let md = match std::fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(UnsafeDir::Unreadable { what, path, source }),
    };
    if md.file_type().is_symlink() {
        return Err(UnsafeDir::Symlink { what, path });
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(UnsafeDir::Owner { what, path, uid: md.uid(), me });
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(UnsafeDir::Writable { what, path, mode });
    }
    Ok(())
}

/// Whether a file or directory owned by `uid` may decide what root does: root's own, or ours.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Checks a file imgdeploy acts on as root (the config, a trusted key, a
/// hook program): owned by root (or by us) and not writable by group or
/// others, and so is every directory above it (a world-writable directory
/// counts only with the sticky bit, like /tmp). Otherwise a local user could
/// choose the keys, the source or the program root runs.
pub fn check_trusted_file(path: &Path, what: &'static str) -> Result<(), UnsafeDir> {
    // Missing files are reported by whoever reads them, with a better message.
    let Ok(real) = std::fs::canonicalize(path) else { return Ok(()) };
    let Ok(md) = std::fs::metadata(&real) else { return Ok(()) };
    let shown = path.display().to_string();
    if !trusted_owner(md.uid()) {
        return Err(UnsafeDir::Owner { what, path: shown, uid: md.uid(), me: nix::unistd::geteuid().as_raw() });
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(UnsafeDir::Writable { what, path: shown, mode });
    }
    check_trusted_ancestors(&real, what)
}

/// Checks every directory above `path` (canonical) as [`check_trusted_file`] does.
pub fn check_trusted_ancestors(path: &Path, what: &'static str) -> Result<(), UnsafeDir> {
    for dir in path.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
        // A directory we cannot stat is one we cannot be fooled through either.
        let Ok(md) = std::fs::metadata(dir) else { continue };
        let mode = md.permissions().mode() & 0o7777;
        let path = dir.display().to_string();
        if !trusted_owner(md.uid()) {
            return Err(UnsafeDir::ParentOwner { what, path, uid: md.uid() });
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(UnsafeDir::ParentWritable { what, path, mode });
        }
    }
    Ok(())
}

/// The first directory on the way to `path` (itself included) that users
/// other than its owner cannot traverse (no `o+x`), with its mode. A web
/// server reading through `link` as `www-data` fails there with EACCES.
pub fn closed_to_readers(path: &Path) -> Option<(std::path::PathBuf, u32)> {
    path.ancestors().filter(|p| !p.as_os_str().is_empty()).find_map(|p| {
        // A missing directory is created later with a readable mode.
        let md = std::fs::metadata(p).ok()?;
        let mode = md.permissions().mode() & 0o7777;
        (md.is_dir() && mode & 0o001 == 0).then(|| (p.to_owned(), mode))
    })
}

/// Warns when readers other than root cannot reach `dir` (the mount points
/// or the link's directory), naming the directory that stops them.
pub fn warn_if_closed_to_readers(dir: &Path, what: &str) {
    if let Some((p, mode)) = closed_to_readers(dir) {
        tracing::warn!(
            "{what} {} cannot be reached by unprivileged readers such as a web server: {} is mode {mode:o}; run `chmod o+x {}`",
            dir.display(),
            p.display(),
            p.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only "not found" counts as absent; a path that cannot be examined
    /// (here ENOTDIR; EACCES for a non-root user) is refused, not trusted.
    #[test]
    fn an_unexaminable_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_dir(&d.path().join("missing"), "state_dir").is_ok());
        std::fs::write(d.path().join("file"), b"").unwrap();
        let e = check_dir(&d.path().join("file/below"), "state_dir").unwrap_err();
        assert!(matches!(e, UnsafeDir::Unreadable { .. }), "{e}");
    }

    #[test]
    fn refuses_writable_and_symlinked_dirs() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_dir(&dir, "state_dir").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(check_dir(&dir, "state_dir"), Err(UnsafeDir::Writable { mode: 0o777, .. })));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(check_dir(&link, "state_dir"), Err(UnsafeDir::Symlink { .. })));
        check_dir(&d.path().join("missing"), "state_dir").unwrap();
    }

    #[test]
    fn trusted_files_and_their_parents() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("etc");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.join("imgdeploy.toml");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_trusted_file(&f, "config file").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(matches!(check_trusted_file(&f, "config file"), Err(UnsafeDir::Writable { mode: 0o664, .. })));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A world-writable parent: anyone could swap the file.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(check_trusted_file(&f, "config file"), Err(UnsafeDir::ParentWritable { mode: 0o777, .. })));
        // ...unless it is sticky, like /tmp.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_trusted_file(&f, "config file").unwrap();
        // Missing: the reader reports it.
        check_trusted_file(&dir.join("missing"), "config file").unwrap();
    }

    #[test]
    fn finds_the_directory_that_stops_readers() {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        for p in [d.path(), &d.path().join("a"), &inner] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // /tmp and / are traversable on any sane system.
        assert_eq!(closed_to_readers(&inner), None);
        std::fs::set_permissions(d.path().join("a"), std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(closed_to_readers(&inner), Some((d.path().join("a"), 0o750)));
        assert_eq!(closed_to_readers(&inner.join("not-yet")), Some((d.path().join("a"), 0o750)));
    }
}
