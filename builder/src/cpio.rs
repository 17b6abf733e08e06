//! A writer for the "newc" cpio format the kernel unpacks into its initramfs.
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated name, padding to
//! 4 bytes, the data, padding to 4 bytes; the archive ends with `TRAILER!!!`.
//! Timestamps are fixed (0) and inode numbers sequential, so the same inputs
//! give the same archive. Each directory is written once, and
//! [`CpioWriter::parent_dirs`] writes the missing parents of a path.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams a newc archive into `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_ino: 1, dirs: BTreeSet::new() }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let size: u32 = size
            .try_into()
            .map_err(|_| io::Error::other(format!("{name} is larger than 4 GiB, the newc cpio limit")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let h = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0
        );
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// A directory (`name` without a leading slash); one already written is skipped.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        if !self.dirs.insert(name.to_owned()) {
            return Ok(());
        }
        self.header(name, S_IFDIR | perm, 0, (0, 0))
    }

    /// `path` and every directory above it (mode 0755), each written once.
    pub fn dir_all(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        for (i, _) in path.match_indices('/').chain([(path.len(), "")]) {
            if i > 0 {
                self.dir(&path[..i], 0o755)?;
            }
        }
        Ok(())
    }

    /// The directories above `name` (mode 0755) that are not written yet.
    pub fn parent_dirs(&mut self, name: &str) -> io::Result<()> {
        match name.trim_start_matches('/').rsplit_once('/') {
            Some((parent, _)) => self.dir_all(parent),
            None => Ok(()),
        }
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | perm, 0, (major, minor))
    }

    /// A symlink.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// A regular file of exactly `size` bytes read from `data`.
    pub fn file(&mut self, name: &str, perm: u32, size: u64, data: impl Read) -> io::Result<()> {
        self.header(name, S_IFREG | perm, size, (0, 0))?;
        let n = io::copy(&mut data.take(size), &mut self.out)?;
        self.written += n;
        if n != size {
            return Err(io::Error::other(format!("{name}: expected {size} bytes, got {n}")));
        }
        self.pad()
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        // The kernel reads archives in 512-byte units; pad like GNU cpio does.
        let n = (512 - self.written % 512) % 512;
        self.put(&vec![0u8; n as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gnu_cpio_reads_our_archives() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hello", 0o644, 5, &b"hello"[..]).unwrap();
        w.symlink("etc/link", "hello").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        if std::process::Command::new("cpio").arg("--version").output().is_err() {
            return; // structure checked above; GNU cpio absent
        }
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(d.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(d.path().join("etc/hello")).unwrap(), b"hello");
        assert_eq!(std::fs::read_link(d.path().join("etc/link")).unwrap(), std::path::PathBuf::from("hello"));
    }

    #[test]
    fn writes_each_directory_once() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("a", 0o700).unwrap();
        w.parent_dirs("a/b/c/file").unwrap();
        w.dir_all("/a/b/d/").unwrap();
        w.parent_dirs("top-level").unwrap();
        let bytes = w.finish().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for d in ["a\0", "a/b\0", "a/b/c\0", "a/b/d\0"] {
            assert_eq!(text.matches(d).count(), 1, "{d:?} written {} times", text.matches(d).count());
        }
        assert!(!text.contains("a/b/c/file"), "parent_dirs wrote the file itself");
    }

    #[test]
    fn refuses_short_data() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("x", 0o644, 10, &b"abc"[..]).is_err());
    }
}
