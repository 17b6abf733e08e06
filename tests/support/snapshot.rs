//! A complete, comparable description of a tree: every entry's type, mode,
//! owner, mtime, size, content hash, link target, device number, xattrs,
//! link count and hardlink group. Two trees are faithful copies when their
//! snapshots are equal.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use imgdeploy_common::digest::Sha256Digest;

/// What one entry looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 'd', 'f', 'l', 'b', 'c', 'p', 's'.
    pub kind: char,
    /// Full st_mode.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime seconds.
    pub mtime: i64,
    /// Size (files and symlinks; 0 for others, as directory sizes are filesystem-specific).
    pub size: u64,
    /// sha256 of the content (files).
    pub sha256: Option<Sha256Digest>,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Device (major, minor).
    pub rdev: Option<(u64, u64)>,
    /// Sorted xattrs.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Link count.
    pub nlink: u64,
    /// For hardlinked non-directories: the first path (sorted) of the group.
    pub group: Option<Vec<u8>>,
}

/// Path (relative, bytes) to entry, for the whole tree under `root`.
pub type Snapshot = BTreeMap<Vec<u8>, Entry>;

/// Snapshots `root`.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut groups: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut stack = vec![(root.to_owned(), Vec::new())];
    while let Some((path, rel)) = stack.pop() {
        let md = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ft = md.file_type();
        let kind = match () {
            _ if ft.is_dir() => 'd',
            _ if ft.is_file() => 'f',
            _ if ft.is_symlink() => 'l',
            _ if ft.is_block_device() => 'b',
            _ if ft.is_char_device() => 'c',
            _ if ft.is_fifo() => 'p',
            _ => 's',
        };
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&path)
            .map(|names| {
                names
                    .filter(|n| !n.as_bytes().starts_with(b"system."))
                    .map(|n| (n.as_bytes().to_vec(), xattr::get(&path, &n).unwrap().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let group = (kind != 'd' && md.nlink() > 1)
            .then(|| groups.entry((md.dev(), md.ino())).or_insert_with(|| rel.clone()).clone());
        let entry = Entry {
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            size: if matches!(kind, 'f' | 'l') { md.len() } else { 0 },
            sha256: (kind == 'f').then(|| Sha256Digest::of_reader(fs::File::open(&path).unwrap()).unwrap().0),
            target: (kind == 'l').then(|| fs::read_link(&path).unwrap().as_os_str().as_bytes().to_vec()),
            rdev: matches!(kind, 'b' | 'c').then(|| (libc::major(md.rdev()) as u64, libc::minor(md.rdev()) as u64)),
            xattrs,
            nlink: md.nlink(),
            group,
        };
        if kind == 'd' {
            let mut names: Vec<_> = fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name()).collect();
            // Reverse so the stack pops them in sorted order, making group names deterministic.
            names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
            for n in names {
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(n.as_bytes());
                stack.push((path.join(&n), r));
            }
        }
        out.insert(rel, entry);
    }
    out
}

/// Panics with a readable diff unless the snapshots are equal.
#[track_caller]
pub fn assert_same(source: &Snapshot, copy: &Snapshot) {
    let mut problems = Vec::new();
    for (p, e) in source {
        match copy.get(p) {
            None => problems.push(format!("missing in copy: {}", String::from_utf8_lossy(p))),
            Some(c) if c != e => {
                problems.push(format!("differs: {}\n  source {e:?}\n  copy   {c:?}", String::from_utf8_lossy(p)))
            }
            _ => {}
        }
    }
    for p in copy.keys() {
        if !source.contains_key(p) {
            problems.push(format!("extra in copy: {}", String::from_utf8_lossy(p)));
        }
    }
    assert!(problems.is_empty(), "{} entries differ:\n{}", problems.len(), problems.join("\n"));
}
