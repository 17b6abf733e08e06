//! Reading the master tree into memory: every entry's metadata, sorted by
//! name bytes, with hardlinks resolved to one inode. File contents are not
//! read here; [`crate::image`] streams them into the compressor.
//!
//! The walk is strict: anything we cannot reproduce faithfully (an unreadable
//! file, a path that vanishes mid-walk, an xattr squashfs cannot store) is an
//! error naming the path, never a silent omission.
//!
//! The tree may be writable by someone else while it is packed (another user,
//! another CI job), so nothing is opened by a plain path: each directory and
//! file is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from
//! the root's descriptor, so a directory swapped for a symlink cannot lead
//! outside the tree, and the opened inode must be the one the walk recorded
//! (a file swapped for a FIFO or another file is refused, opened
//! non-blocking so a FIFO cannot hang the build). Entries of a directory are
//! examined through `/proc/self/fd/N/NAME` of the directory opened that way.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Why the tree cannot be packed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// SRC is not a directory.
    #[error("{0} is not a directory; give the root of the tree to pack")]
    NotADirectory(PathBuf),
    /// An entry could not be examined or read.
    #[error("cannot read {path}; fix its permissions or leave it out with --exclude")]
    Read {
        /// The entry.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// An entry disappeared while the tree was being read.
    #[error("{0} vanished while the tree was being read; do not change the tree during a build")]
    Vanished(PathBuf),
    /// An entry is no longer what the walk recorded (swapped for a symlink,
    /// a FIFO or another file).
    #[error("{0} was replaced while the tree was being packed (it is not the entry the walk recorded); build from a tree no one else can write to")]
    Replaced(PathBuf),
    /// An extended attribute squashfs cannot store.
    #[error("{path} has extended attribute `{key}`, which squashfs cannot store (only user., trusted. and security. are supported); remove it (e.g. `setfacl -b`) or leave the path out with --exclude")]
    UnsupportedXattr {
        /// The entry.
        path: PathBuf,
        /// The attribute name.
        key: String,
    },
    /// A device number squashfs cannot encode.
    #[error("{path} is device {major}:{minor}; squashfs stores majors up to 4095 and minors up to 1048575")]
    DeviceNumber {
        /// The entry.
        path: PathBuf,
        /// Major number.
        major: u64,
        /// Minor number.
        minor: u64,
    },
    /// A bad --exclude pattern.
    #[error("--exclude `{pattern}` is not a valid glob")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        #[source]
        source: globset::Error,
    },
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory and its children, sorted by name bytes.
    Dir(Vec<usize>),
    /// A regular file of this size.
    File(u64),
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A block device (squashfs-encoded device number).
    BlockDev(u32),
    /// A character device (squashfs-encoded device number).
    CharDev(u32),
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

/// One entry of the tree.
#[derive(Debug, Clone)]
pub struct Node {
    /// File name (empty for the root).
    pub name: Vec<u8>,
    /// Where it is on disk (for messages; it is opened through `rel`).
    pub path: PathBuf,
    /// Its path relative to the tree's root.
    pub rel: PathBuf,
    /// Device and inode number the walk saw.
    pub ino: (u64, u64),
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (squashfs stores u32).
    pub mtime: u32,
    /// Extended attributes, sorted by key.
    pub xattrs: Xattrs,
    /// What it is.
    pub kind: Kind,
    /// For a hardlink after the first: the node that carries the inode.
    pub link_of: Option<usize>,
    /// Number of names this inode has inside the tree (directories: 2 + subdirectories).
    pub nlink: u32,
}

/// A whole tree; `nodes[0]` is the root.
#[derive(Debug, Default)]
pub struct Tree {
    /// All entries, parents before children, siblings in name order.
    pub nodes: Vec<Node>,
    /// Total bytes of regular-file data (each hardlinked file counted once).
    pub data_bytes: u64,
    /// The root directory, which every entry is opened beneath.
    root: Option<OwnedFd>,
}

impl Tree {
    /// Opens the regular file `node` for reading: beneath the root, through
    /// no symlink, never blocking, and only if it is still the inode the
    /// walk recorded.
    pub fn open_file(&self, node: &Node) -> Result<File, WalkError> {
        let root = self.root.as_ref().ok_or_else(|| WalkError::Vanished(node.path.clone()))?;
        let f = open_beneath(root, &node.rel, OFlag::O_NONBLOCK).map_err(|e| classify_open(&node.path, e))?;
        let md = f.metadata().map_err(|e| classify(&node.path, e))?;
        if !md.is_file() || (md.dev(), md.ino()) != node.ino {
            return Err(WalkError::Replaced(node.path.clone()));
        }
        Ok(f)
    }
}

/// Opens `rel` beneath the directory `root`: no symlink is followed on the
/// way or at the end, and nothing outside `root` is reached.
fn open_beneath(root: &OwnedFd, rel: &Path, flags: OFlag) -> io::Result<File> {
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match openat2(root, rel, how) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::ENOSYS) => Err(io::Error::other("openat2 is not available; imgbuild needs Linux 5.6 or later")),
        Err(e) => Err(e.into()),
    }
}

/// A symlink met on the way (`ELOOP`), a way out of the tree (`EXDEV`) or a
/// directory that became something else (`ENOTDIR`) means the tree changed.
fn classify_open(path: &Path, e: io::Error) -> WalkError {
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR) => WalkError::Replaced(path.to_owned()),
        _ => classify(path, e),
    }
}

/// The path through which the open directory `dir` can be named.
fn fd_path(dir: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// Opens the directory `node` beneath `root`, checking it is the one the walk recorded.
fn open_dir(root: &OwnedFd, node: &Node) -> Result<File, WalkError> {
    let dir = open_beneath(root, &node.rel, OFlag::O_DIRECTORY).map_err(|e| classify_open(&node.path, e))?;
    let md = dir.metadata().map_err(|e| classify(&node.path, e))?;
    if (md.dev(), md.ino()) != node.ino {
        return Err(WalkError::Replaced(node.path.clone()));
    }
    Ok(dir)
}

/// Squashfs encodes device numbers like the kernel's `new_encode_dev`.
pub fn encode_dev(major: u64, minor: u64) -> Option<u32> {
    if major > 0xfff || minor > 0xfffff {
        return None;
    }
    Some(((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u32)
}

/// Compiles `--exclude` patterns: relative to SRC, `*` stays within one path
/// component, `**` crosses them; a matching directory is left out whole.
pub fn compile_excludes(patterns: &[String]) -> Result<GlobSet, WalkError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let trimmed = p.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
        let glob = GlobBuilder::new(trimmed)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|source| WalkError::Pattern { pattern: p.clone(), source })?;
        b.add(glob);
    }
    b.build().map_err(|source| WalkError::Pattern { pattern: patterns.join(" "), source })
}

fn lstat(path: &Path, shown: &Path) -> Result<fs::Metadata, WalkError> {
    fs::symlink_metadata(path).map_err(|e| classify(shown, e))
}

/// Maps "not found" to [`WalkError::Vanished`], anything else to [`WalkError::Read`].
pub fn classify(path: &Path, e: io::Error) -> WalkError {
    if e.kind() == io::ErrorKind::NotFound {
        WalkError::Vanished(path.to_owned())
    } else {
        WalkError::Read { path: path.to_owned(), source: e }
    }
}

/// Extended attributes as (name, value) pairs, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The extended attributes of the entry at `path` (named `shown` in messages).
fn read_xattrs(path: &Path, shown: &Path) -> Result<Xattrs, WalkError> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        // Filesystems without xattr support simply have none.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(classify(shown, e)),
    };
    let mut out = Vec::new();
    for name in names {
        let key = name.as_bytes().to_vec();
        if !(key.starts_with(b"user.") || key.starts_with(b"trusted.") || key.starts_with(b"security.")) {
            return Err(WalkError::UnsupportedXattr {
                path: shown.to_owned(),
                key: name.to_string_lossy().into_owned(),
            });
        }
        // An attribute removed between list and get is a tree changing under us.
        let value = xattr::get(path, &name)
            .map_err(|e| classify(shown, e))?
            .ok_or_else(|| WalkError::Vanished(shown.to_owned()))?;
        out.push((key, value));
    }
    out.sort();
    Ok(out)
}

fn mtime_of(path: &Path, md: &fs::Metadata) -> u32 {
    let t = md.mtime();
    match u32::try_from(t) {
        Ok(v) => v,
        Err(_) => {
            let clamped = if t < 0 { 0 } else { u32::MAX };
            tracing::warn!(
                "{}: mtime {t} is outside what squashfs stores (1970..2106); stored as {clamped}",
                path.display()
            );
            clamped
        }
    }
}

/// Reads the tree at `root`, leaving out paths that match `exclude`.
pub fn read_tree(root: &Path, exclude: &GlobSet) -> Result<Tree, WalkError> {
    let md = lstat(root, root)?;
    if !md.is_dir() {
        return Err(WalkError::NotADirectory(root.to_owned()));
    }
    let root_dir = File::options()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(root)
        .map_err(|e| classify_open(root, e))?;
    let mut tree = Tree::default();
    let mut inodes: HashMap<(u64, u64), usize> = HashMap::new();
    tree.nodes.push(node_from(&fd_path(&root_dir), root, PathBuf::new(), Vec::new(), &md)?);
    let root_fd = OwnedFd::from(root_dir);
    // Depth-first with an explicit stack of directory node indexes.
    let mut stack: Vec<usize> = vec![0];
    while let Some(dir_idx) = stack.pop() {
        let dir = open_dir(&root_fd, &tree.nodes[dir_idx])?;
        let (dir_path, rel) = (tree.nodes[dir_idx].path.clone(), tree.nodes[dir_idx].rel.clone());
        let io_dir = fd_path(&dir);
        let rd = fs::read_dir(&io_dir).map_err(|e| classify(&dir_path, e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| classify(&dir_path, e))?;
            names.push(entry.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut children = Vec::with_capacity(names.len());
        let mut subdirs = 0u32;
        for name in names {
            let child_rel = rel.join(&name);
            if exclude.is_match(&child_rel) {
                continue;
            }
            let path = dir_path.join(&name);
            let io_path = io_dir.join(&name);
            let md = lstat(&io_path, &path)?;
            let idx = tree.nodes.len();
            let mut node = node_from(&io_path, &path, child_rel, name.as_bytes().to_vec(), &md)?;
            if !md.is_dir() && md.nlink() > 1 {
                match inodes.get(&(md.dev(), md.ino())) {
                    Some(&first) => {
                        node.link_of = Some(first);
                        tree.nodes[first].nlink += 1;
                    }
                    None => {
                        inodes.insert((md.dev(), md.ino()), idx);
                    }
                }
            }
            if let (Kind::File(size), None) = (&node.kind, node.link_of) {
                tree.data_bytes += size;
            }
            if md.is_dir() {
                subdirs += 1;
                stack.push(idx);
            }
            tree.nodes.push(node);
            children.push(idx);
        }
        tree.nodes[dir_idx].nlink = 2 + subdirs;
        tree.nodes[dir_idx].kind = Kind::Dir(children);
    }
    tree.root = Some(root_fd);
    Ok(tree)
}

/// A node for the entry reachable at `io` (shown as `path`), whose metadata is `md`.
fn node_from(io: &Path, path: &Path, rel: PathBuf, name: Vec<u8>, md: &fs::Metadata) -> Result<Node, WalkError> {
    let ft = md.file_type();
    let dev = |md: &fs::Metadata| {
        let (major, minor) = (libc::major(md.rdev()) as u64, libc::minor(md.rdev()) as u64);
        encode_dev(major, minor).ok_or_else(|| WalkError::DeviceNumber { path: path.to_owned(), major, minor })
    };
    let kind = if ft.is_dir() {
        Kind::Dir(Vec::new())
    } else if ft.is_file() {
        Kind::File(md.len())
    } else if ft.is_symlink() {
        let t = fs::read_link(io).map_err(|e| classify(path, e))?;
        Kind::Symlink(t.as_os_str().as_bytes().to_vec())
    } else if ft.is_block_device() {
        Kind::BlockDev(dev(md)?)
    } else if ft.is_char_device() {
        Kind::CharDev(dev(md)?)
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        return Err(WalkError::Read { path: path.to_owned(), source: io::Error::other("unknown file type") });
    };
    Ok(Node {
        name,
        path: path.to_owned(),
        rel,
        ino: (md.dev(), md.ino()),
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: mtime_of(path, md),
        xattrs: read_xattrs(io, path)?,
        kind,
        link_of: None,
        nlink: 1,
    })
}

/// The name as an `OsStr`, for messages.
pub fn display_name(n: &Node) -> &OsStr {
    OsStr::from_bytes(&n.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn device_encoding_matches_kernel_new_encode_dev() {
        // Values from the kernel's new_encode_dev().
        let cases = [(8, 1, 0x801), (300, 70000, 0x1111_2c70), (4095, 0xfffff, 0xffff_ffff), (0, 0, 0)];
        for (maj, min, want) in cases {
            assert_eq!(encode_dev(maj, min), Some(want), "{maj}:{min}");
        }
        assert_eq!(encode_dev(4096, 0), None);
        assert_eq!(encode_dev(0, 0x100000), None);
    }

    #[test]
    fn sorted_hardlinks_and_excludes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("b/cache/x")).unwrap();
        fs::write(r.join("b/keep"), b"k").unwrap();
        fs::write(r.join("a"), b"hello").unwrap();
        fs::hard_link(r.join("a"), r.join("b/a2")).unwrap();
        symlink("a", r.join("c")).unwrap();
        let ex = compile_excludes(&["b/cache".into(), "*.tmp".into()]).unwrap();
        fs::write(r.join("z.tmp"), b"").unwrap();
        let t = read_tree(r, &ex).unwrap();
        let names: Vec<_> = t.nodes.iter().map(|n| String::from_utf8_lossy(&n.name).into_owned()).collect();
        assert_eq!(names, ["", "a", "b", "c", "a2", "keep"]);
        assert_eq!(t.nodes[1].nlink, 2);
        assert_eq!(t.nodes[4].link_of, Some(1));
        assert_eq!(t.nodes[0].nlink, 3);
        assert_eq!(t.nodes[2].nlink, 2, "excluded subdirectory is not counted");
        assert_eq!(t.data_bytes, 6);
        assert_eq!(t.nodes[3].kind, Kind::Symlink(b"a".to_vec()));
    }

    #[test]
    fn not_a_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"").unwrap();
        let none = compile_excludes(&[]).unwrap();
        assert!(matches!(read_tree(&f, &none), Err(WalkError::NotADirectory(_))));
        assert!(matches!(read_tree(&d.path().join("missing"), &none), Err(WalkError::Vanished(_))));
    }
}
