//! Making the static deltas a build publishes (see
//! [`imgdeploy_common::sdelta`] for the format and why).
//!
//! A build of a channel makes one delta from each of the channel's last K
//! images: the image its current manifest serves and the `from` images of
//! that manifest's deltas, newest first. Both images' block maps say where
//! every block is and what it holds, so each block of the new image
//! becomes, in order of preference:
//! - a copy, when an old block has the same bytes on disk;
//! - a patch of its uncompressed bytes against old blocks likely to
//!   resemble it (bsdiff for metadata, zstd with the old blocks as its
//!   prefix for data): an old block with the same content, else the same file's
//!   blocks around the same position (data), the old fragment block that
//!   held the same files' tails (fragments), or the metadata blocks around
//!   the same position in the tables (inodes whose `blocks_start` moved
//!   differ in a few bytes each, which bsdiff's difference bytes absorb);
//! - its bytes as a literal, when a patch would not be smaller.
//!
//! The finished delta is applied to the old image with [`sdelta::apply`],
//! as a deployer would (recompressing every patched block with the
//! deployer's function), and must give the new image's bytes: a block whose
//! patch does not reproduce is carried as a literal in a second try, and a
//! delta that still does not give the image is not published.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use imgdeploy_common::blockmap::{Block, BlockKind, BlockMap, SPARSE};
use imgdeploy_common::compress::Compressor;
use imgdeploy_common::digest::{Sha256Digest, StreamHasher};
use imgdeploy_common::sdelta::{
    self, DeltaReader, DeltaWriter, Header, NewBlock, OldBlock, Op, PatchKind, MAX_LITERAL, MAX_REFS,
};

use crate::blocks::read_block;

/// Old fragment blocks one new fragment block is patched against.
const FRAGMENT_REFS: usize = 3;

/// What making one delta did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeltaReport {
    /// The image it starts from.
    pub from: Sha256Digest,
    /// Size of the delta file.
    pub size: u64,
    /// Bytes of the new image copied from the old one.
    pub copied: u64,
    /// Bytes of blocks made by patches.
    pub patched: u64,
    /// Bytes carried as literals.
    pub literal: u64,
    /// Blocks patched.
    pub blocks_patched: u64,
    /// Time taken, including the check.
    pub ms: u64,
}

/// One image to make a delta from.
#[derive(Debug)]
pub struct Base<'a> {
    /// Its sha256.
    pub sha256: Sha256Digest,
    /// The image file.
    pub path: &'a Path,
    /// Its block map (verified by the caller).
    pub map: &'a BlockMap,
}

/// Ops in output order, with runs of copies and literals merged.
struct Emitter<W: Write> {
    w: DeltaWriter<W>,
    pending: Option<Op>,
}

impl<W: Write> Emitter<W> {
    fn copy(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(Op::Copy { offset: o, len: l }) = &mut self.pending {
            if *o + *l == offset {
                *l += len;
                return Ok(());
            }
        }
        self.emit(Some(Op::Copy { offset, len }))
    }

    fn literal(&mut self, bytes: &[u8]) -> io::Result<()> {
        for piece in bytes.chunks(MAX_LITERAL as usize) {
            if let Some(Op::Literal(v)) = &mut self.pending {
                if v.len() + piece.len() <= MAX_LITERAL as usize {
                    v.extend_from_slice(piece);
                    continue;
                }
            }
            self.emit(Some(Op::Literal(piece.to_vec())))?;
        }
        Ok(())
    }

    /// The old offset right after a pending copy.
    fn copy_end(&self) -> Option<u64> {
        match &self.pending {
            Some(Op::Copy { offset, len }) => Some(offset + len),
            _ => None,
        }
    }

    fn emit(&mut self, next: Option<Op>) -> io::Result<()> {
        if let Some(op) = std::mem::replace(&mut self.pending, next) {
            self.w.push(&op)?;
        }
        Ok(())
    }
}

/// Where each new block's likely look-alikes are in the old image.
struct Finder<'a> {
    old: &'a BlockMap,
    new: &'a BlockMap,
    old_by_disk: HashMap<Sha256Digest, usize>,
    old_by_raw: HashMap<Sha256Digest, usize>,
    /// Old file path -> index in `old.files`.
    old_files: HashMap<&'a [u8], usize>,
    /// New block index -> (new file index, position in its block list).
    new_owner: HashMap<u32, (usize, usize)>,
    /// New fragment block index -> the files whose tails it holds.
    new_tails: HashMap<u32, Vec<usize>>,
    /// Metadata block index -> ordinal among metadata blocks, and back (old).
    new_meta: HashMap<u32, usize>,
    old_meta: Vec<usize>,
}

impl<'a> Finder<'a> {
    fn new(old: &'a BlockMap, new: &'a BlockMap) -> Self {
        let mut f = Finder {
            old,
            new,
            old_by_disk: HashMap::new(),
            old_by_raw: HashMap::new(),
            old_files: old.files.iter().enumerate().map(|(i, f)| (&f.path[..], i)).collect(),
            new_owner: HashMap::new(),
            new_tails: HashMap::new(),
            new_meta: HashMap::new(),
            old_meta: Vec::new(),
        };
        for (i, b) in old.blocks.iter().enumerate() {
            f.old_by_disk.entry(b.disk_sha256).or_insert(i);
            f.old_by_raw.entry(b.raw_sha256).or_insert(i);
            if b.kind == BlockKind::Metadata {
                f.old_meta.push(i);
            }
        }
        for (fi, file) in new.files.iter().enumerate() {
            for (k, &b) in file.blocks.iter().enumerate() {
                if b != SPARSE {
                    f.new_owner.entry(b).or_insert((fi, k));
                }
            }
            if let Some(t) = file.tail {
                f.new_tails.entry(t.block).or_default().push(fi);
            }
        }
        let mut ordinal = 0;
        for (i, b) in new.blocks.iter().enumerate() {
            if b.kind == BlockKind::Metadata {
                f.new_meta.insert(i as u32, ordinal);
                ordinal += 1;
            }
        }
        f
    }

    /// Old blocks (indexes) to patch new block `i` against, best first.
    fn refs(&self, i: usize) -> Vec<usize> {
        let b = &self.new.blocks[i];
        if let Some(&o) = self.old_by_raw.get(&b.raw_sha256) {
            return vec![o];
        }
        let around = |list: &[u32], k: usize| -> Vec<usize> {
            (k.saturating_sub(1)..(k + 2).min(list.len()))
                .map(|j| list[j])
                .filter(|&x| x != SPARSE)
                .map(|x| x as usize)
                .collect()
        };
        match b.kind {
            BlockKind::Data => {
                let Some(&(fi, k)) = self.new_owner.get(&(i as u32)) else { return Vec::new() };
                let Some(&oi) = self.old_files.get(&self.new.files[fi].path[..]) else { return Vec::new() };
                let list = &self.old.files[oi].blocks;
                if list.is_empty() {
                    return Vec::new();
                }
                around(list, k.min(list.len() - 1))
            }
            BlockKind::Fragment => {
                // The old fragment blocks that held most of the same files'
                // tails (tails move between blocks when files come or go),
                // in image order.
                let mut votes: HashMap<u32, usize> = HashMap::new();
                for &fi in self.new_tails.get(&(i as u32)).map(Vec::as_slice).unwrap_or(&[]) {
                    let old_tail =
                        self.old_files.get(&self.new.files[fi].path[..]).and_then(|&o| self.old.files[o].tail);
                    if let Some(t) = old_tail {
                        *votes.entry(t.block).or_default() += 1;
                    }
                }
                let mut ranked: Vec<(u32, usize)> = votes.into_iter().collect();
                ranked.sort_by_key(|&(b, n)| (std::cmp::Reverse(n), b));
                let mut best: Vec<usize> = ranked.into_iter().take(FRAGMENT_REFS).map(|(b, _)| b as usize).collect();
                best.sort_unstable();
                best
            }
            BlockKind::Metadata => {
                if self.old_meta.is_empty() {
                    return Vec::new();
                }
                let j = self.new_meta[&(i as u32)].min(self.old_meta.len() - 1);
                (j.saturating_sub(1)..(j + 2).min(self.old_meta.len())).map(|x| self.old_meta[x]).collect()
            }
        }
    }
}

fn old_block(b: &Block) -> OldBlock {
    OldBlock { offset: b.offset, size: b.size, raw_size: b.raw_size, stored: b.stored }
}

/// Writes the delta from `base` to the new image (`new_path`, whose first
/// `new_map.image_size` bytes are the squashfs part) into `out`.
/// Blocks whose offset is in `literal` are carried as literals (they did
/// not reproduce from their patch in an earlier try).
pub fn generate<W: Write>(
    base: &Base<'_>,
    new_path: &Path,
    new_sha256: Sha256Digest,
    new_map: &BlockMap,
    literal: &HashSet<u64>,
    out: W,
) -> io::Result<(W, DeltaReport)> {
    let old = File::open(base.path)?;
    let new = File::open(new_path)?;
    let compressor: Compressor = new_map.compressor;
    let header = Header { from: base.sha256, to: new_sha256, out_size: new_map.image_size, compressor };
    let mut e = Emitter { w: DeltaWriter::new(out, &header)?, pending: None };
    let finder = Finder::new(base.map, new_map);
    let mut report =
        DeltaReport { from: base.sha256, size: 0, copied: 0, patched: 0, literal: 0, blocks_patched: 0, ms: 0 };
    let mut pos = 0u64;
    let mut gap = Vec::new();
    let mut old_gap = Vec::new();
    let mut patches = HashMap::new();
    let next_offsets = new_map.blocks.iter().map(|b| b.offset).chain([new_map.image_size]);
    for (i, offset) in next_offsets.enumerate() {
        // The bytes between blocks: copied when the old image has them right
        // after the copy before, else literal.
        if offset > pos {
            gap.resize((offset - pos) as usize, 0);
            new.read_exact_at(&mut gap, pos)?;
            let same = e.copy_end().is_some_and(|at| {
                old_gap.resize(gap.len(), 0);
                old.read_exact_at(&mut old_gap, at).is_ok() && old_gap == gap
            });
            match e.copy_end() {
                Some(at) if same => e.copy(at, gap.len() as u64)?,
                _ => e.literal(&gap)?,
            }
            report.literal += if same { 0 } else { gap.len() as u64 };
            report.copied += if same { gap.len() as u64 } else { 0 };
        }
        let Some(b) = new_map.blocks.get(i) else { break };
        pos = b.offset + b.size as u64;
        if let Some(&o) = finder.old_by_disk.get(&b.disk_sha256) {
            e.copy(base.map.blocks[o].offset, b.size as u64)?;
            report.copied += b.size as u64;
            continue;
        }
        if !patches.contains_key(&i) {
            patches = patches_ahead(&finder, &old, &new, new_map, literal, i)?;
        }
        let mut disk = vec![0u8; b.size as usize];
        new.read_exact_at(&mut disk, b.offset)?;
        match patches.remove(&i).flatten() {
            Some(op) => {
                e.emit(Some(op))?;
                report.patched += b.size as u64;
                report.blocks_patched += 1;
            }
            None => {
                e.literal(&disk)?;
                report.literal += b.size as u64;
            }
        }
    }
    e.emit(None)?;
    Ok((e.w.finish()?, report))
}

/// Blocks whose patches [`patches_ahead`] makes at once, per core (at most
/// 16 cores): enough to keep every core busy, few enough that their patches
/// (each under 90% of its block) stay small in memory.
/// (Unit tests use 2, so their small images cross many windows.)
const PATCH_WINDOW: usize = if cfg!(test) { 2 } else { 64 };

/// Patch ops (`None`: a literal serves) for the blocks from `first` that
/// need one, up to [`PATCH_WINDOW`] per core of them, made on every core:
/// patching is most of a delta's making, and blocks are independent.
fn patches_ahead(
    finder: &Finder<'_>,
    old: &File,
    new: &File,
    new_map: &BlockMap,
    literal: &HashSet<u64>,
    first: usize,
) -> io::Result<HashMap<usize, Option<Op>>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let wanted: Vec<usize> = (first..new_map.blocks.len())
        .filter(|&i| !finder.old_by_disk.contains_key(&new_map.blocks[i].disk_sha256))
        .take(PATCH_WINDOW * workers)
        .collect();
    let share = wanted.len().div_ceil(workers).max(1);
    std::thread::scope(|s| {
        let made: Vec<_> = wanted
            .chunks(share)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|&i| {
                            let b = &new_map.blocks[i];
                            let op =
                                if literal.contains(&b.offset) { None } else { patch_for(finder, old, i, new, b)? };
                            Ok((i, op))
                        })
                        .collect::<io::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut patches = HashMap::with_capacity(wanted.len());
        for worker in made {
            patches.extend(worker.join().map_err(|_| io::Error::other("a patching thread panicked"))??);
        }
        Ok(patches)
    })
}

/// A patch op for new block `i` (block `b` of the image `new`), if one is
/// smaller than the block. Whether it reproduces is checked by [`check`],
/// which recompresses each patched block once, as a deployer does.
fn patch_for(finder: &Finder<'_>, old: &File, i: usize, new: &File, b: &Block) -> io::Result<Option<Op>> {
    let refs = finder.refs(i);
    if refs.is_empty() {
        return Ok(None);
    }
    let mut base = Vec::new();
    let mut olds = Vec::with_capacity(MAX_REFS);
    for &r in refs.iter().take(MAX_REFS) {
        let ob = &finder.old.blocks[r];
        // An old block that does not match its map is no base.
        let Ok(bytes) = read_block(old, ob) else { return Ok(None) };
        base.extend_from_slice(&bytes);
        olds.push(old_block(ob));
    }
    let raw = read_block(new, b)?;
    // bsdiff where many bytes change by a little (inodes whose data moved);
    // zstd with the old blocks as its prefix on data, where bsdiff's suffix
    // sort of a 384 KiB base would dominate the build.
    let kind = if b.kind == BlockKind::Metadata { PatchKind::Bsdiff } else { PatchKind::Zstd };
    let patch = sdelta::make_patch(kind, &base, &raw);
    // The file is compressed as a whole: judge the patch by its packed size.
    let packed = zstd::bulk::compress(&patch, 3)?.len();
    if packed >= b.size as usize * 9 / 10 {
        return Ok(None);
    }
    let metadata = b.kind == BlockKind::Metadata;
    let block = NewBlock { size: b.size, raw_size: b.raw_size, stored: b.stored, metadata, sha256: b.disk_sha256 };
    Ok(Some(Op::Patch { block, refs: olds, kind, patch }))
}

/// Why [`check`] refused a delta.
#[derive(Debug)]
pub enum CheckError {
    /// These regions (offset, length) of the new image did not reproduce.
    Unreproduced(Vec<(u64, u64)>),
    /// Anything else.
    Other(io::Error),
}

impl From<io::Error> for CheckError {
    fn from(e: io::Error) -> Self {
        CheckError::Other(e)
    }
}

/// Applies the delta file at `delta` to `base` as a deployer would and
/// checks that it gives the first `new_map.image_size` bytes of the image
/// whose first bytes hash to `want`.
pub fn check(delta: &Path, base: &Path, scratch: &Path, data_size: u64, want: Sha256Digest) -> Result<(), CheckError> {
    let old = File::open(base)?;
    let out = tempfile::tempfile_in(scratch)?;
    let mut reader = DeltaReader::new(io::BufReader::new(File::open(delta)?)).map_err(io::Error::other)?;
    let stats = sdelta::apply(&mut reader, &old, &out, &|_| ()).map_err(io::Error::other)?;
    if stats.unreproduced_bytes > 0 {
        return Err(CheckError::Unreproduced(stats.unreproduced));
    }
    let mut h = StreamHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < data_size {
        let n = (data_size - at).min(buf.len() as u64) as usize;
        out.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    let (got, _) = h.finish();
    if got != want {
        return Err(io::Error::other(format!("it makes bytes with sha256 {got}, not {want}")).into());
    }
    Ok(())
}

/// sha256 of the first `n` bytes of `path`.
pub fn prefix_sha256(path: &Path, n: u64) -> io::Result<Sha256Digest> {
    let f = File::open(path)?;
    let (d, got) = Sha256Digest::of_reader(io::Read::take(io::BufReader::with_capacity(1 << 20, f), n))?;
    if got != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} is shorter than {n} bytes", path.display()),
        ));
    }
    Ok(d)
}

/// A path for a temporary delta file next to where it will be published.
pub fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!(
        ".tmp-{}-{}.delta",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ))
}

/// Makes the delta from `base` into a temporary file in `dir`, checks it,
/// and returns the file with its report; `Ok(None)` when it is not smaller
/// than `limit` bytes (the image: a full download is as good). A block
/// whose patch does not reproduce is carried as a literal in a second try.
pub fn make(
    base: &Base<'_>,
    new_path: &Path,
    new_sha256: Sha256Digest,
    new_map: &BlockMap,
    dir: &Path,
    limit: u64,
) -> io::Result<Option<(PathBuf, DeltaReport)>> {
    let started = Instant::now();
    let tmp = temp_path(dir);
    let want = prefix_sha256(new_path, new_map.image_size)?;
    let mut literal = HashSet::new();
    let result = (|| {
        for attempt in 0..2 {
            // A fresh file each try, never one planted under the name.
            if attempt > 0 {
                std::fs::remove_file(&tmp)?;
            }
            let file = File::create_new(&tmp)?;
            let (w, mut report) = generate(base, new_path, new_sha256, new_map, &literal, io::BufWriter::new(file))?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            report.size = file.metadata()?.len();
            if report.size >= limit {
                return Ok(None);
            }
            match check(&tmp, base.path, dir, new_map.image_size, want) {
                Ok(()) => {
                    report.ms = started.elapsed().as_millis() as u64;
                    return Ok(Some(report));
                }
                Err(CheckError::Unreproduced(regions)) if attempt == 0 => {
                    let blocks = new_map.blocks.iter().filter(|b| {
                        regions.iter().any(|&(at, len)| b.offset < at + len && at < b.offset + b.size as u64)
                    });
                    literal.extend(blocks.map(|b| b.offset));
                    tracing::warn!(
                        "{} blocks do not reproduce from their patches; carrying them as literals",
                        literal.len()
                    );
                }
                Err(CheckError::Unreproduced(regions)) => {
                    return Err(io::Error::other(format!("{} regions still do not reproduce", regions.len())))
                }
                Err(CheckError::Other(e)) => return Err(e),
            }
        }
        unreachable!("the second attempt returns")
    })();
    match result {
        Ok(Some(report)) => Ok(Some((tmp, report))),
        other => {
            let _ = std::fs::remove_file(&tmp);
            other.map(|_| None)
        }
    }
}

/// The images a new build of `channel` makes deltas from, newest first, at
/// most `k`: the image the channel's current manifest (signed by `trusted`)
/// serves, then the `from` images of that manifest's deltas. Each comes
/// with its block map's signed reference.
pub fn bases_for(
    repo: &crate::publish::Repo,
    channel: &str,
    trusted: &[imgdeploy_common::sign::PublicKey],
    k: usize,
) -> Vec<(Sha256Digest, imgdeploy_common::manifest::BlockMapRef)> {
    if k == 0 {
        return Vec::new();
    }
    let m = match crate::publish::current_manifest(repo, channel, trusted) {
        Ok(Some(m)) => m,
        Ok(None) => return Vec::new(),
        Err(e) => {
            tracing::warn!("no static deltas: {}", imgdeploy_common::report::one_line(&e));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    if let Some(map) = m.block_map {
        out.push((m.image.sha256, map));
    }
    out.extend(m.deltas.into_iter().map(|d| (d.from, d.from_map)));
    out.truncate(k);
    out
}

/// Makes, checks and stores a delta from each of `bases` to the stored
/// image `to` (mapped by `to_map`), and returns their manifest entries
/// with what each took. A base the repository no longer holds, or whose
/// delta is not smaller than the image, is skipped with a note.
pub fn publish(
    repo: &crate::publish::Repo,
    bases: &[(Sha256Digest, imgdeploy_common::manifest::BlockMapRef)],
    to: &crate::publish::StoredImage,
    to_map: &BlockMap,
) -> Result<Vec<(imgdeploy_common::manifest::DeltaRef, DeltaReport)>, crate::publish::PublishError> {
    use imgdeploy_common::manifest::{delta_path, image_path, DeltaRef, DELTAS_DIR};
    let dir = repo.root().join(DELTAS_DIR);
    let err = |source| crate::publish::PublishError::Repo { path: dir.clone(), source };
    imgdeploy_common::atomic::create_dir_all_durable(&dir, 0o755).map_err(err)?;
    let mut out = Vec::new();
    for (from, map_ref) in bases {
        if *from == to.sha256 {
            continue;
        }
        let image = repo.root().join(image_path(from));
        let map = match crate::publish::load_map(&repo.root().join(&map_ref.path), map_ref) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("no static delta from {from}: {e}");
                continue;
            }
        };
        if !image.is_file() {
            tracing::info!("no static delta from {from}: the repository no longer holds that image");
            continue;
        }
        let base = Base { sha256: *from, path: &image, map: &map };
        let made = make(&base, &to.path, to.sha256, to_map, &dir, to.size).map_err(|e| {
            // The old image did not give the new one: a bug, or a damaged file in the repository.
            tracing::warn!("no static delta from {from}: {e}");
        });
        let Ok(Some((tmp, report))) = made else {
            if let Ok(None) = made {
                tracing::info!("no static delta from {from}: it would not be smaller than the image");
            }
            continue;
        };
        let sha256 = Sha256Digest::of_reader(io::BufReader::new(File::open(&tmp).map_err(err)?)).map_err(err)?.0;
        let rel = delta_path(from, &to.sha256);
        imgdeploy_common::atomic::commit_file(&tmp, &repo.root().join(&rel)).map_err(err)?;
        tracing::info!(
            "static delta from {from}: {} bytes ({} copied, {} patched in {} blocks, {} literal) in {} ms",
            report.size,
            report.copied,
            report.patched,
            report.blocks_patched,
            report.literal,
            report.ms
        );
        out.push((DeltaRef { from: *from, from_map: map_ref.clone(), path: rel, sha256, size: report.size }, report));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgdeploy_common::blockmap::{FileBlocks, Tail};

    fn block(offset: u64, kind: BlockKind, content: u8) -> Block {
        Block {
            offset,
            size: 10,
            raw_size: 20,
            kind,
            stored: false,
            raw_sha256: Sha256Digest([content; 32]),
            disk_sha256: Sha256Digest([content ^ 0x80; 32]),
        }
    }

    fn file(path: &str, blocks: Vec<u32>, tail: Option<u32>) -> FileBlocks {
        FileBlocks {
            path: path.as_bytes().to_vec(),
            size: 131072 * blocks.len() as u64 + 1,
            blocks,
            tail: tail.map(|block| Tail { block, offset: 0 }),
        }
    }

    fn map(blocks: Vec<Block>, files: Vec<FileBlocks>) -> BlockMap {
        BlockMap { compressor: Compressor::identity(3), block_size: 131072, image_size: 1000, blocks, files }
    }

    #[test]
    fn look_alikes_are_found_by_content_file_tails_and_position() {
        use BlockKind::*;
        let old = map(
            vec![
                block(0, Data, 1),
                block(10, Data, 2),
                block(20, Data, 3),
                block(30, Data, 4),
                block(40, Fragment, 5),
                block(50, Fragment, 6),
                block(60, Metadata, 7),
                block(70, Metadata, 8),
                block(80, Metadata, 9),
            ],
            vec![file("a", vec![0, 1, 2, 3], Some(4)), file("b", vec![], Some(5)), file("c", vec![], Some(5))],
        );
        let new = map(
            vec![
                block(0, Data, 1),
                block(10, Data, 22),
                block(20, Data, 4),
                block(30, Data, 40),
                block(40, Fragment, 50),
                block(50, Metadata, 70),
                block(60, Metadata, 80),
                block(70, Metadata, 90),
                block(80, Metadata, 91),
            ],
            vec![
                file("a", vec![0, 1, 2], None),
                file("new", vec![3], None),
                file("b", vec![], Some(4)),
                file("c", vec![], Some(4)),
                file("a-tail", vec![], Some(4)),
            ],
        );
        let f = Finder::new(&old, &new);
        assert_eq!(f.refs(0), vec![0], "same content");
        assert_eq!(f.refs(1), vec![0, 1, 2], "the same file's blocks around position 1");
        assert_eq!(f.refs(2), vec![3], "same content beats position");
        assert_eq!(f.refs(3), Vec::<usize>::new(), "a new file has nothing to patch against");
        assert_eq!(f.refs(4), vec![5], "the fragment block that held b's and c's tails");
        assert_eq!(f.refs(5), vec![6, 7], "the first metadata blocks");
        assert_eq!(f.refs(6), vec![6, 7, 8]);
        assert_eq!(f.refs(8), vec![7, 8], "past the old tables' end: their last blocks");
    }

    #[test]
    fn fragment_refs_rank_by_tails_then_keep_image_order() {
        use BlockKind::*;
        let old = map(
            (0..5).map(|i| block(i * 10, Fragment, i as u8)).collect(),
            vec![
                file("a", vec![], Some(4)),
                file("b", vec![], Some(4)),
                file("c", vec![], Some(1)),
                file("d", vec![], Some(1)),
                file("e", vec![], Some(1)),
                file("f", vec![], Some(3)),
                file("g", vec![], Some(0)),
                file("h", vec![], Some(0)),
            ],
        );
        let new = map(
            vec![block(0, Fragment, 99)],
            ["a", "b", "c", "d", "e", "f", "g", "h"].iter().map(|p| file(p, vec![], Some(0))).collect(),
        );
        assert_eq!(Finder::new(&old, &new).refs(0), vec![0, 1, 4], "the three most voted, in image order");
    }

    /// An "image" of one file's data blocks compressed at `level`, and its
    /// map, which says `map_level`.
    fn image(dir: &Path, name: &str, raws: &[Vec<u8>], level: u32, map_level: u32) -> (PathBuf, BlockMap) {
        let mut comp = imgdeploy_common::compress::BlockCompressor::new(level).unwrap();
        let mut bytes = Vec::new();
        let mut blocks = Vec::new();
        for raw in raws {
            let (disk, stored) = comp.pack(raw).unwrap();
            blocks.push(Block {
                offset: bytes.len() as u64,
                size: disk.len() as u32,
                raw_size: raw.len() as u32,
                kind: BlockKind::Data,
                stored,
                raw_sha256: Sha256Digest::of_bytes(raw),
                disk_sha256: Sha256Digest::of_bytes(&disk),
            });
            bytes.extend_from_slice(&disk);
        }
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let files = vec![FileBlocks {
            path: b"f".to_vec(),
            size: raws.iter().map(|r| r.len() as u64).sum(),
            blocks: (0..raws.len() as u32).collect(),
            tail: None,
        }];
        let map = BlockMap {
            compressor: Compressor::identity(map_level),
            block_size: 131072,
            image_size: bytes.len() as u64,
            blocks,
            files,
        };
        (path, map)
    }

    fn text(seed: u8) -> Vec<u8> {
        (0..131072u32).map(|i| b"abcdefgh \n"[((i.wrapping_mul(2654435761) >> 7) as u8 ^ seed) as usize % 10]).collect()
    }

    /// A delta is checked by applying it as a deployer would; blocks whose
    /// patches do not reproduce (here: the map names another zstd level
    /// than the blocks were compressed at) are carried as literals instead.
    #[test]
    fn make_checks_the_delta_and_falls_back_to_literals() {
        let dir = tempfile::tempdir().unwrap();
        let raws: Vec<Vec<u8>> = (0..4).map(text).collect();
        let mut edited = raws.clone();
        edited[2][5000..9096].copy_from_slice(&[b'#'; 4096]);
        for (level, map_level, patched) in [(3, 3, true), (3, 9, false)] {
            let (old, old_map) = image(dir.path(), "old", &raws, level, map_level);
            let (new, new_map) = image(dir.path(), "new", &edited, level, map_level);
            let new_sha = Sha256Digest::of_bytes(&std::fs::read(&new).unwrap());
            let base = Base { sha256: Sha256Digest([1; 32]), path: &old, map: &old_map };
            let size = std::fs::metadata(&new).unwrap().len();
            let (file, report) = make(&base, &new, new_sha, &new_map, dir.path(), size).unwrap().unwrap();
            let block = new_map.blocks[2].size as u64;
            assert_eq!(report.copied, size - block, "the three unchanged blocks are copied");
            if patched {
                assert_eq!((report.patched, report.blocks_patched, report.literal), (block, 1, 0));
                assert!(report.size < block / 4, "a 4 KiB edit made a {}-byte delta", report.size);
            } else {
                assert_eq!((report.patched, report.literal), (0, block), "not reproduced: a literal");
            }
            // What a deployer makes from it is the new image.
            let out = dir.path().join("out");
            let mut r = DeltaReader::new(File::open(&file).unwrap()).unwrap();
            let (o, w) = (File::open(&old).unwrap(), File::create(&out).unwrap());
            sdelta::apply(&mut r, &o, &w, &|_| ()).unwrap();
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&new).unwrap(), "level {map_level}: differs");
            // Not smaller than the limit: not made.
            assert!(make(&base, &new, new_sha, &new_map, dir.path(), report.size).unwrap().is_none());
            std::fs::remove_file(&file).unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 3, "temporary files left behind: {left:?}");
    }

    #[test]
    fn patches_made_window_by_window_stay_in_image_order() {
        // 13 blocks, 11 edited: the patches are made several windows at a
        // time on every core, and must still come out in block order.
        let dir = tempfile::tempdir().unwrap();
        let raws: Vec<Vec<u8>> = (0..13).map(text).collect();
        let mut edited = raws.clone();
        for (k, raw) in edited.iter_mut().enumerate().filter(|(k, _)| *k != 4 && *k != 9) {
            raw[300 * k..300 * k + 2048].copy_from_slice(&[b'#'; 2048]);
        }
        let (old, old_map) = image(dir.path(), "old", &raws, 3, 3);
        let (new, new_map) = image(dir.path(), "new", &edited, 3, 3);
        let new_sha = Sha256Digest::of_bytes(&std::fs::read(&new).unwrap());
        let base = Base { sha256: Sha256Digest([1; 32]), path: &old, map: &old_map };
        let size = std::fs::metadata(&new).unwrap().len();
        let (file, report) = make(&base, &new, new_sha, &new_map, dir.path(), size).unwrap().unwrap();
        assert_eq!(report.blocks_patched, 11);
        assert_eq!(report.copied, (new_map.blocks[4].size + new_map.blocks[9].size) as u64);
        let out = dir.path().join("out");
        let mut r = DeltaReader::new(File::open(&file).unwrap()).unwrap();
        let (o, w) = (File::open(&old).unwrap(), File::create(&out).unwrap());
        let stats = sdelta::apply(&mut r, &o, &w, &|_| ()).unwrap();
        assert_eq!(stats.patched, report.patched);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&new).unwrap(), "the result differs");
    }

    #[test]
    fn copies_and_literals_merge_into_runs() {
        let h = Header {
            from: Sha256Digest([1; 32]),
            to: Sha256Digest([2; 32]),
            out_size: MAX_LITERAL as u64 + 36,
            compressor: Compressor::identity(3),
        };
        let mut e = Emitter { w: DeltaWriter::new(Vec::new(), &h).unwrap(), pending: None };
        e.copy(100, 10).unwrap();
        assert_eq!(e.copy_end(), Some(110));
        e.copy(110, 5).unwrap();
        e.copy(200, 5).unwrap();
        e.literal(&vec![7; MAX_LITERAL as usize - 2]).unwrap();
        e.literal(b"abcd").unwrap();
        e.literal(b"efgh").unwrap();
        assert_eq!(e.copy_end(), None);
        e.copy(300, 10).unwrap();
        e.emit(None).unwrap();
        let bytes = e.w.finish().unwrap();
        let mut r = DeltaReader::new(&bytes[..]).unwrap();
        let mut ops = Vec::new();
        while let Some(op) = r.next_op().unwrap() {
            ops.push(op);
        }
        // Described by kind and length: a failure must not print a megabyte.
        let shape: Vec<String> = ops
            .iter()
            .map(|op| match op {
                Op::Copy { offset, len } => format!("copy {offset}+{len}"),
                Op::Literal(b) => format!("literal {} ending {:?}", b.len(), &b[b.len() - 2..]),
                Op::Patch { .. } => "patch".into(),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "copy 100+15".to_string(),
                "copy 200+5".into(),
                // "abcd" does not fit the first literal: it starts the next.
                format!("literal {} ending [7, 7]", MAX_LITERAL - 2),
                "literal 8 ending [103, 104]".into(),
                "copy 300+10".into(),
            ]
        );
    }
}
