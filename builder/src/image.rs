//! Writing a [`Tree`] as a squashfs image through [`crate::sqfs`].
//!
//! All decisions that make the image faithful and reproducible live here:
//! file data is fed in sorted depth-first order; inode numbers are assigned
//! in post-order (children before their directory, root last); each hardlink
//! group is one inode with the group's link count; directories get
//! `2 + subdirectories` links and their parent's inode number (the root's
//! parent is `inode_count + 1`, as mksquashfs does, so `..` is listed); the
//! superblock time comes from `SOURCE_DATE_EPOCH` or the newest mtime in the
//! tree, never the clock.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use imgdeploy_common::blockmap::BlockMap;
use imgdeploy_common::compress::Compressor;

use crate::blocks::{build_map, MapBuildError, MappedFile, Packer, ReuseIndex, ReuseStats};
use crate::sqfs::{FileSlot, ImageWriter, Inode, Special, SqfsError, WriterOptions};
use crate::tree::{classify, Kind, Node, Tree, WalkError};

/// Data block size (128 KiB, as the issue and mksquashfs default).
pub const BLOCK_SIZE: u32 = 128 * 1024;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// libsquashfs failed.
    #[error(transparent)]
    Sqfs(#[from] SqfsError),
    /// A source file could not be read.
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// A file changed size while it was read.
    #[error("{path} changed while it was being packed ({expected} bytes when listed, {found} when read); do not change the tree during a build")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Size when the tree was read.
        expected: u64,
        /// Bytes actually read.
        found: u64,
    },
    /// A name contains a NUL byte (impossible on Linux, but checked).
    #[error("{0} has a name squashfs cannot store")]
    Name(PathBuf),
    /// The compressor could not be set up.
    #[error("cannot set up zstd compression")]
    Compressor(#[source] std::io::Error),
    /// The finished image could not be mapped.
    #[error(transparent)]
    Map(#[from] MapBuildError),
}

/// How to write the image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// zstd level, 1..=22.
    pub level: u32,
    /// Compression threads.
    pub workers: u32,
    /// Superblock time; `None` = newest mtime in the tree.
    pub mtime: Option<u32>,
    /// Pack file tails into shared fragment blocks (smaller images; a file
    /// that changes size then shifts every later fragment, see BENCHMARKS.md).
    pub fragments: bool,
    /// Start every file's data blocks at a 4 KiB boundary and pad after
    /// them. A file whose bytes did not change then sits on whole
    /// filesystem blocks in both images, so a deployer on XFS or btrfs
    /// shares its extents with the old image instead of copying them
    /// (`copy_file_range` reflinks aligned ranges). Costs about 2 KiB of
    /// zeros per file of a block or more.
    pub align: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ImageStats {
    /// Image size in bytes (padded to 4 KiB).
    pub size: u64,
    /// Number of inodes.
    pub inodes: u32,
    /// Regular-file bytes read.
    pub data_bytes: u64,
    /// Blocks reused from earlier images and blocks compressed.
    pub reuse: ReuseStats,
    /// Where every block of the image is.
    pub map: BlockMap,
}

/// Children before parents, siblings in name order, root last; each inode
/// (hardlink group) appears once, at its first name in this order.
fn post_order(tree: &Tree) -> Vec<usize> {
    let mut out = Vec::with_capacity(tree.nodes.len());
    let mut stack: Vec<(usize, usize)> = vec![(0, 0)];
    while let Some((idx, pos)) = stack.pop() {
        let children = match &tree.nodes[idx].kind {
            Kind::Dir(c) => c.as_slice(),
            _ => &[],
        };
        if pos < children.len() {
            stack.push((idx, pos + 1));
            stack.push((children[pos], 0));
        } else {
            out.push(idx);
        }
    }
    out
}

fn primary(tree: &Tree, idx: usize) -> usize {
    tree.nodes[idx].link_of.unwrap_or(idx)
}

fn cstring(bytes: &[u8], path: &Path) -> Result<CString, ImageError> {
    CString::new(bytes.to_vec()).map_err(|_| ImageError::Name(path.to_owned()))
}

/// Streams one file's contents into the compressor, checking its size.
fn pack_file(
    w: &mut ImageWriter,
    tree: &Tree,
    node: &Node,
    expected: u64,
    buf: &mut [u8],
    progress: &dyn Fn(u64),
) -> Result<(), ImageError> {
    // The very inode the walk saw, reached without any symlink.
    let mut f = tree.open_file(node)?;
    let path = &node.path;
    let mut total = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify(path, e).into()),
        };
        total += n as u64;
        if total > expected {
            return Err(ImageError::Changed { path: path.to_owned(), expected, found: total });
        }
        w.append(&buf[..n])?;
        progress(n as u64);
    }
    if total != expected {
        return Err(ImageError::Changed { path: path.to_owned(), expected, found: total });
    }
    Ok(())
}

/// Writes `tree` to a new file at `out`, copying the compressed bytes of
/// every block `reuse` holds instead of compressing it again, and maps the
/// result. `progress` is told of every data byte packed.
pub fn write_image(
    tree: &Tree,
    out: &Path,
    opts: &ImageOptions,
    reuse: ReuseIndex,
    progress: &dyn Fn(u64),
) -> Result<ImageStats, ImageError> {
    let newest = tree.nodes.iter().map(|n| n.mtime).max().unwrap_or(0);
    let compressor = Compressor::identity(opts.level);
    let (packer, record) = Packer::new(compressor, reuse).map_err(ImageError::Compressor)?;
    let mut w = ImageWriter::create(
        out,
        &WriterOptions {
            level: opts.level,
            block_size: BLOCK_SIZE,
            workers: opts.workers,
            mtime: opts.mtime.unwrap_or(newest),
        },
        Box::new(packer),
    )?;

    // 1. File data, in sorted depth-first (pre-)order so that neighbouring
    //    files in the tree are neighbours in the image.
    let mut slots: Vec<Option<FileSlot>> = vec![None; tree.nodes.len()];
    let mut packed = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![0usize];
    while let Some(idx) = stack.pop() {
        let node = &tree.nodes[idx];
        match &node.kind {
            Kind::Dir(children) => stack.extend(children.iter().rev()),
            Kind::File(size) if node.link_of.is_none() => {
                packed.push(idx);
                slots[idx] = Some(w.begin_file(!opts.fragments, opts.align)?);
                pack_file(&mut w, tree, node, *size, &mut buf, progress)?;
                w.end_file()?;
            }
            _ => {}
        }
    }
    w.finish_data()?;
    let fragments = w.fragment_blocks()?;
    let mut layouts = vec![None; tree.nodes.len()];

    // 2. Inode numbers, post-order.
    let order = post_order(tree);
    let mut number = vec![0u32; tree.nodes.len()];
    let mut next = 1u32;
    for &idx in &order {
        let p = primary(tree, idx);
        if number[p] == 0 {
            number[p] = next;
            next += 1;
        }
    }
    let inode_count = next - 1;

    // 3. Inodes and directories, in the same order.
    let mut iref = vec![u64::MAX; tree.nodes.len()];
    let mut parent = vec![inode_count + 1; tree.nodes.len()];
    for (idx, node) in tree.nodes.iter().enumerate() {
        if let Kind::Dir(children) = &node.kind {
            for &c in children {
                parent[c] = number[idx];
            }
        }
    }
    for &idx in &order {
        let p = primary(tree, idx);
        if iref[p] != u64::MAX {
            continue; // another name of an inode already written
        }
        let node = &tree.nodes[p];
        let xattr_pairs = node
            .xattrs
            .iter()
            .map(|(k, v)| Ok((cstring(k, &node.path)?, v.clone())))
            .collect::<Result<Vec<_>, ImageError>>()?;
        let xattr = w.xattrs(&xattr_pairs)?;
        let mut inode = match &node.kind {
            Kind::Dir(children) => {
                let mut entries = Vec::with_capacity(children.len());
                for &c in children {
                    let cp = primary(tree, c);
                    let child = &tree.nodes[c];
                    entries.push((
                        cstring(&child.name, &child.path)?,
                        number[cp],
                        iref[cp],
                        tree.nodes[cp].mode as u16,
                    ));
                }
                w.write_dir(&entries, xattr, node.nlink, parent[p])?
            }
            Kind::File(_) => {
                let slot = slots[p].expect("every primary file was packed");
                let mut inode = w.take_file_inode(slot)?;
                layouts[p] = inode.file_layout();
                inode.set_file_nlink(node.nlink)?;
                inode
            }
            Kind::Symlink(t) => Inode::special(Special::Symlink(t), node.nlink)?,
            Kind::BlockDev(d) => Inode::special(Special::BlockDev(*d), node.nlink)?,
            Kind::CharDev(d) => Inode::special(Special::CharDev(*d), node.nlink)?,
            Kind::Fifo => Inode::special(Special::Fifo, node.nlink)?,
            Kind::Socket => Inode::special(Special::Socket, node.nlink)?,
        };
        let uid = w.id_index(node.uid)?;
        let gid = w.id_index(node.gid)?;
        inode.set_base(node.mode as u16, uid, gid, node.mtime, number[p]);
        if !matches!(node.kind, Kind::Dir(_)) {
            inode.set_xattr(xattr)?;
        }
        iref[p] = w.write_inode(&inode)?;
    }
    let (size, tables) = w.finalize(inode_count, iref[0])?;

    // 4. The block map, from the bytes now in the file.
    let files = packed
        .iter()
        .map(|&idx| {
            let layout = layouts[idx].take().ok_or_else(|| {
                MapBuildError::Structure(format!("{} has no file inode", tree.nodes[idx].path.display()))
            })?;
            Ok(MappedFile { path: tree.nodes[idx].rel.as_os_str().as_bytes(), layout })
        })
        .collect::<Result<Vec<_>, MapBuildError>>()?;
    // What only the inodes needed: freed before the map is built, the last
    // and largest allocation of a build.
    drop((layouts, slots, iref, number, parent, order));
    let image = std::fs::File::open(out).map_err(|e| ImageError::Map(MapBuildError::Read(e)))?;
    let map = build_map(&image, size, &tables, BLOCK_SIZE, compressor, files, &fragments, &record)?;
    Ok(ImageStats { size, inodes: inode_count, data_bytes: tree.data_bytes, reuse: record.stats(), map })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{compile_excludes, read_tree};
    use imgdeploy_common::squashfs::Superblock;

    #[test]
    fn writes_a_valid_superblock_reproducibly() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::fs::write(src.join("d/f"), vec![7u8; 300_000]).unwrap();
        std::fs::write(src.join("small"), b"x").unwrap();
        let tree = read_tree(&src, &compile_excludes(&[]).unwrap()).unwrap();
        let opts = ImageOptions { level: 3, workers: 2, mtime: Some(1_000), fragments: true, align: false };
        let (a, b) = (d.path().join("a.sqfs"), d.path().join("b.sqfs"));
        let st = write_image(&tree, &a, &opts, ReuseIndex::default(), &|_| {}).unwrap();
        write_image(&tree, &b, &opts, ReuseIndex::default(), &|_| {}).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes, std::fs::read(&b).unwrap(), "two builds differ");
        assert_eq!(bytes.len() as u64, st.size);
        assert_eq!(st.size % 4096, 0);
        let sb = Superblock::parse(&bytes).unwrap();
        assert_eq!(
            (sb.inode_count, sb.modification_time, sb.compression(), sb.block_size),
            (5, 1_000, "zstd", BLOCK_SIZE)
        );
        sb.check_size(st.size).unwrap();
        assert!(write_image(&tree, &a, &opts, ReuseIndex::default(), &|_| {}).is_err(), "overwrote an existing file");
    }

    /// With `align`, every file's first block starts on a 4 KiB boundary
    /// (also after a duplicate, whose blocks are those of the file it
    /// repeats), and without it blocks are packed as they come.
    #[test]
    fn aligned_files_start_on_4k_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let noise = |n: usize, seed: u64| -> Vec<u8> {
            let mut x = seed;
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect()
        };
        for (i, n) in [300_001usize, 131_072, 200_000, 5_000].into_iter().enumerate() {
            std::fs::write(src.join(format!("f{i}")), noise(n, i as u64)).unwrap();
        }
        std::fs::write(src.join("f1-again"), noise(131_072, 1)).unwrap();
        let tree = read_tree(&src, &compile_excludes(&[]).unwrap()).unwrap();
        let starts = |align: bool, fragments: bool| {
            let opts = ImageOptions { level: 3, workers: 2, mtime: Some(1_000), fragments, align };
            let out = d.path().join(format!("{align}-{fragments}.sqfs"));
            let st = write_image(&tree, &out, &opts, ReuseIndex::default(), &|_| {}).unwrap();
            let m = &st.map;
            m.files.iter().filter_map(|f| f.blocks.first()).map(|&b| m.blocks[b as usize].offset).collect::<Vec<_>>()
        };
        for fragments in [true, false] {
            let aligned = starts(true, fragments);
            assert_eq!(aligned.len(), if fragments { 4 } else { 5 }, "files with blocks");
            assert!(aligned.iter().all(|o| o % 4096 == 0), "unaligned start in {aligned:?}");
            assert!(starts(false, fragments).iter().any(|o| o % 4096 != 0), "packed images are not aligned by chance");
        }
    }

    #[test]
    fn files_that_vanish_or_change_after_the_walk_are_named() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("gone"), b"x").unwrap();
        std::fs::write(src.join("grows"), b"x").unwrap();
        let tree = read_tree(&src, &compile_excludes(&[]).unwrap()).unwrap();
        let opts = ImageOptions { level: 1, workers: 1, mtime: None, fragments: true, align: false };
        // A second name outside the tree keeps the inode alive, so the file
        // recreated below cannot get its number back.
        std::fs::hard_link(src.join("gone"), d.path().join("keep")).unwrap();
        std::fs::remove_file(src.join("gone")).unwrap();
        let err = write_image(&tree, &d.path().join("a"), &opts, ReuseIndex::default(), &|_| {}).unwrap_err();
        assert!(matches!(&err, ImageError::Walk(WalkError::Vanished(p)) if p.ends_with("gone")), "{err}");
        // Recreated under the same name: another inode, not the file the walk saw.
        std::fs::write(src.join("gone"), b"x").unwrap();
        let err = write_image(&tree, &d.path().join("b"), &opts, ReuseIndex::default(), &|_| {}).unwrap_err();
        assert!(matches!(&err, ImageError::Walk(WalkError::Replaced(p)) if p.ends_with("gone")), "{err}");
        // The same inode, grown.
        let tree = read_tree(&src, &compile_excludes(&[]).unwrap()).unwrap();
        std::fs::write(src.join("grows"), b"xx").unwrap();
        let err = write_image(&tree, &d.path().join("c"), &opts, ReuseIndex::default(), &|_| {}).unwrap_err();
        assert!(matches!(&err, ImageError::Changed { expected: 1, found: 2, .. }), "{err}");
    }
}
