//! Crash-safe file replacement: write a temp file beside the target, fsync
//! it, rename it over the target, fsync the directory. A reader (or a crash)
//! sees the old file or the new one, never a mix or nothing. New directories
//! are made durable the same way: fsync the parent each one was created in.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// fsyncs a directory so that renames and creations in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory containing `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Creates `path` and its missing parents with permission bits `mode` (less
/// the umask), fsyncing each directory a new one was created in, so that a
/// power cut cannot take back a directory that files were then committed
/// into. (ext4 and xfs commit a mkdir with the next fsync of anything; POSIX
/// does not promise that.)
pub fn create_dir_all_durable(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    let parent = parent_dir(path);
    if parent != path {
        create_dir_all_durable(&parent, mode)?;
    }
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => fsync_dir(&parent),
        // Created meanwhile by someone else, who makes it durable.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Atomically replaces `path` with `bytes`, with permission bits `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let mut tmp =
        tempfile::Builder::new().prefix(".tmp-").permissions(fs::Permissions::from_mode(mode)).tempfile_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fsync_dir(&dir)
}

/// Atomically moves the finished file `tmp` to `path` (same filesystem),
/// after making its contents durable.
pub fn commit_file(tmp: &Path, path: &Path) -> io::Result<()> {
    File::open(tmp)?.sync_all()?;
    fs::rename(tmp, path)?;
    fsync_dir(&parent_dir(path))
}

/// Creates `path` exclusively (fails if it exists) with mode `mode`, writes
/// `bytes` and fsyncs. For files that must never be overwritten, like keys.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    // The umask may have narrowed the mode; set exactly what was asked.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fsync_dir(&parent_dir(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_directories_durably_and_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all_durable(&deep, 0o700).unwrap();
        assert!(deep.is_dir());
        assert_eq!(fs::metadata(dir.path().join("a")).unwrap().permissions().mode() & 0o077, 0);
        create_dir_all_durable(&deep, 0o700).unwrap();
        create_dir_all_durable(Path::new("."), 0o700).unwrap();
        fs::write(dir.path().join("file"), b"x").unwrap();
        let e = create_dir_all_durable(&dir.path().join("file/sub"), 0o700).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "a file where a directory goes: {e}");
    }

    #[test]
    fn replaces_atomically_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_new_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        create_new(&p, b"a", 0o600).unwrap();
        assert_eq!(create_new(&p, b"b", 0o600).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"a");
    }
}
