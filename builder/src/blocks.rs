//! Compressing blocks, reusing earlier images' blocks, and the block map.
//!
//! Every block libsquashfs writes goes through a [`Packer`]. It hashes the
//! uncompressed block; when an earlier image of the repository holds a
//! block with that content (found through its signed block map, and of the
//! same kind: metadata blocks are compressed at their own level), it copies
//! that image's compressed bytes instead of compressing again, after
//! checking them against the map's hash of the bytes on disk, so a
//! corrupted or swapped earlier image is never copied from. As builder and
//! map share one compressor identity ([`imgdeploy_common::compress`]), the
//! copied bytes are the very bytes compression would give, and an
//! incremental image is byte-identical to one built from scratch.
//!
//! The packer also remembers, for every block it produced, the hash of its
//! bytes on disk and of its uncompressed content. Once the image is
//! complete, [`build_map`] locates every block (file inodes for data
//! blocks, the fragment table for fragment blocks, a walk of the tables for
//! metadata blocks), reads it back and names its content from that record,
//! so the map describes the bytes actually in the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use imgdeploy_common::blockmap::{Block, BlockKind, BlockMap, FileBlocks, Tail, METADATA_BLOCK, SPARSE};
use imgdeploy_common::compress::{decompress_block, BlockCompressor, Compressor, Packed};
use imgdeploy_common::digest::Sha256Digest;

use crate::sqfs::{BlockPacker, FileLayout, FragmentBlock, Tables};

/// squashfs size word: the block is stored uncompressed.
const STORED: u32 = 1 << 24;
/// squashfs metadata header: the block is stored uncompressed.
const META_STORED: u16 = 0x8000;

/// An earlier image whose blocks may be copied.
#[derive(Debug)]
pub struct Source {
    /// For messages.
    pub path: PathBuf,
    /// The image, opened once.
    pub file: File,
    /// Its block map (verified against its signed manifest by the caller).
    pub map: BlockMap,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    source: usize,
    offset: u64,
    size: u32,
    stored: bool,
    disk_sha256: Sha256Digest,
}

/// Blocks of earlier images, by whether they are metadata (compressed at
/// another level than data) and the hash of their uncompressed content.
#[derive(Debug, Default)]
pub struct ReuseIndex {
    /// The images (their maps are dropped once indexed).
    sources: Vec<(PathBuf, File)>,
    by_content: HashMap<(bool, Sha256Digest), Candidate>,
}

impl ReuseIndex {
    /// Indexes the blocks of every source made by `compressor`; sources
    /// made by another compressor (level, zstd release) are left out, as
    /// their bytes would differ from a fresh build's.
    pub fn new(sources: Vec<Source>, compressor: Compressor) -> Self {
        let mut idx = ReuseIndex::default();
        for s in sources {
            if s.map.compressor != compressor {
                let (was, is) = (s.map.compressor, compressor);
                tracing::info!(
                    "not reusing {}: compressed by zstd {} at level {} (metadata {}), this build uses zstd {} at level {} (metadata {})",
                    s.path.display(),
                    was.zstd_version,
                    was.level,
                    was.metadata_level,
                    is.zstd_version,
                    is.level,
                    is.metadata_level
                );
                continue;
            }
            let source = idx.sources.len();
            for b in &s.map.blocks {
                let c =
                    Candidate { source, offset: b.offset, size: b.size, stored: b.stored, disk_sha256: b.disk_sha256 };
                idx.by_content.entry((b.kind == BlockKind::Metadata, b.raw_sha256)).or_insert(c);
            }
            idx.sources.push((s.path, s.file));
        }
        idx
    }

    /// Number of distinct blocks that can be reused.
    pub fn len(&self) -> usize {
        self.by_content.len()
    }

    /// Whether nothing can be reused.
    pub fn is_empty(&self) -> bool {
        self.by_content.is_empty()
    }
}

/// How many bytes were reused and how many compressed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReuseStats {
    /// Blocks copied from an earlier image.
    pub reused_blocks: u64,
    /// Their uncompressed bytes.
    pub reused_bytes: u64,
    /// Blocks compressed in this build.
    pub compressed_blocks: u64,
    /// Their uncompressed bytes.
    pub compressed_bytes: u64,
    /// Earlier blocks whose bytes no longer match their map (compressed instead).
    pub rejected_blocks: u64,
}

/// What the packers of one build share.
#[derive(Debug)]
struct Shared {
    compressor: Compressor,
    reuse: ReuseIndex,
    /// (stored, sha256 on disk) -> (sha256 uncompressed, uncompressed length).
    produced: Mutex<HashMap<(bool, Sha256Digest), (Sha256Digest, u32)>>,
    reused_blocks: AtomicU64,
    reused_bytes: AtomicU64,
    compressed_blocks: AtomicU64,
    compressed_bytes: AtomicU64,
    rejected_blocks: AtomicU64,
}

/// The [`BlockPacker`] of a build; see the module docs.
pub struct Packer {
    compressor: BlockCompressor,
    /// Packs metadata blocks: copies only earlier metadata blocks.
    metadata: bool,
    shared: Arc<Shared>,
    scratch: Vec<u8>,
}

/// A handle on what the packers recorded, kept by the image writer.
#[derive(Debug, Clone)]
pub struct Record(Arc<Shared>);

impl Packer {
    /// A packer of data and fragment blocks at `compressor`'s level
    /// (metadata at its metadata level: [`BlockPacker::for_metadata`]),
    /// reusing from `reuse`, and the handle on its record.
    pub fn new(compressor: Compressor, reuse: ReuseIndex) -> io::Result<(Self, Record)> {
        let shared = Arc::new(Shared {
            compressor,
            reuse,
            produced: Mutex::new(HashMap::new()),
            reused_blocks: AtomicU64::new(0),
            reused_bytes: AtomicU64::new(0),
            compressed_blocks: AtomicU64::new(0),
            compressed_bytes: AtomicU64::new(0),
            rejected_blocks: AtomicU64::new(0),
        });
        Ok((Packer::sharing(shared.clone(), false)?, Record(shared)))
    }

    /// A packer of metadata blocks or of the others, at their level.
    fn sharing(shared: Arc<Shared>, metadata: bool) -> io::Result<Self> {
        let compressor = BlockCompressor::new(shared.compressor.level_of(metadata))?;
        Ok(Packer { compressor, metadata, shared, scratch: Vec::new() })
    }

    /// Copies an earlier image's block for content `raw` into `out`, if
    /// there is one whose bytes still hash to what its map says.
    fn reuse(&mut self, raw: &Sha256Digest, input: &[u8], out: &mut [u8]) -> Option<Packed> {
        let c = *self.shared.reuse.by_content.get(&(self.metadata, *raw))?;
        let n = c.size as usize;
        // A stored block is the input itself; a compressed one must be shorter.
        let fits = if c.stored { n == input.len() } else { n < input.len() && n <= out.len() };
        if !fits {
            return None;
        }
        self.scratch.resize(n, 0);
        let (path, file) = &self.shared.reuse.sources[c.source];
        let ok = file.read_exact_at(&mut self.scratch, c.offset).is_ok()
            && Sha256Digest::of_bytes(&self.scratch) == c.disk_sha256;
        if !ok {
            if self.shared.rejected_blocks.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    "{} does not hold the block its map names at offset {}; compressing instead of reusing it",
                    path.display(),
                    c.offset
                );
            }
            return None;
        }
        if c.stored {
            return Some(Packed::Stored);
        }
        out[..n].copy_from_slice(&self.scratch);
        Some(Packed::Compressed(n))
    }
}

impl BlockPacker for Packer {
    fn pack(&mut self, input: &[u8], out: &mut [u8]) -> io::Result<Packed> {
        let raw = Sha256Digest::of_bytes(input);
        let s = self.shared.clone();
        let packed = match self.reuse(&raw, input, out) {
            Some(p) => {
                s.reused_blocks.fetch_add(1, Ordering::Relaxed);
                s.reused_bytes.fetch_add(input.len() as u64, Ordering::Relaxed);
                p
            }
            None => {
                s.compressed_blocks.fetch_add(1, Ordering::Relaxed);
                s.compressed_bytes.fetch_add(input.len() as u64, Ordering::Relaxed);
                self.compressor.compress(input, out)?
            }
        };
        let key = match packed {
            Packed::Compressed(n) => (false, Sha256Digest::of_bytes(&out[..n])),
            Packed::Stored => (true, raw),
        };
        s.produced.lock().expect("no packer panics holding the lock").insert(key, (raw, input.len() as u32));
        Ok(packed)
    }

    fn fork(&self) -> io::Result<Box<dyn BlockPacker>> {
        Ok(Box::new(Packer::sharing(self.shared.clone(), self.metadata)?))
    }

    fn for_metadata(&self) -> io::Result<Box<dyn BlockPacker>> {
        Ok(Box::new(Packer::sharing(self.shared.clone(), true)?))
    }
}

impl Record {
    /// The counts so far.
    pub fn stats(&self) -> ReuseStats {
        let s = &self.0;
        ReuseStats {
            reused_blocks: s.reused_blocks.load(Ordering::Relaxed),
            reused_bytes: s.reused_bytes.load(Ordering::Relaxed),
            compressed_blocks: s.compressed_blocks.load(Ordering::Relaxed),
            compressed_bytes: s.compressed_bytes.load(Ordering::Relaxed),
            rejected_blocks: s.rejected_blocks.load(Ordering::Relaxed),
        }
    }

    fn content(&self, stored: bool, disk: &Sha256Digest) -> Option<(Sha256Digest, u32)> {
        self.0.produced.lock().expect("no packer panics holding the lock").get(&(stored, *disk)).copied()
    }
}

/// Why a block map could not be made (a bug, or the image changed under us).
#[derive(Debug, thiserror::Error)]
pub enum MapBuildError {
    /// The image could not be read back.
    #[error("reading back the image to map its blocks")]
    Read(#[source] io::Error),
    /// The image does not have the structure it was written with.
    #[error("the image's blocks cannot be mapped: {0}; this is a bug in imgbuild, please report it")]
    Structure(String),
}

/// One regular file to list in the map.
#[derive(Debug)]
pub struct MappedFile<'a> {
    /// Path relative to the root.
    pub path: &'a [u8],
    /// Where its data went.
    pub layout: FileLayout,
}

/// Table arrays (uncompressed u64 block locations, and the xattr table's
/// header) the metadata walk skips: (start, length).
fn table_arrays(image: &File, t: &Tables) -> Result<Vec<(u64, u64)>, MapBuildError> {
    let array = |entries: u64, entry_size: u64| entries.saturating_mul(entry_size).div_ceil(8192) * 8;
    let mut v = vec![(t.id_table_start, array(t.id_count as u64, 4))];
    if t.fragment_entry_count > 0 && t.fragment_table_start != u64::MAX {
        v.push((t.fragment_table_start, array(t.fragment_entry_count as u64, 16)));
    }
    if t.xattr_id_table_start != u64::MAX {
        // { u64 start of the key-value blocks, u32 ids, u32 unused }
        let mut head = [0u8; 16];
        image.read_exact_at(&mut head, t.xattr_id_table_start).map_err(MapBuildError::Read)?;
        let ids = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        v.push((t.xattr_id_table_start, 16 + array(ids as u64, 16)));
    }
    Ok(v)
}

/// Reads the squashfs metadata headers from the inode table to the end:
/// (offset of the block after its header, size, stored) for each.
fn metadata_blocks(image: &File, t: &Tables) -> Result<Vec<(u64, u32, bool)>, MapBuildError> {
    let arrays: HashMap<u64, u64> = table_arrays(image, t)?.into_iter().collect();
    let mut out = Vec::new();
    let mut pos = t.inode_table_start;
    while pos < t.bytes_used {
        if let Some(len) = arrays.get(&pos) {
            pos += len;
            continue;
        }
        let mut h = [0u8; 2];
        image.read_exact_at(&mut h, pos).map_err(MapBuildError::Read)?;
        let h = u16::from_le_bytes(h);
        let len = (h & !META_STORED) as u32;
        if len == 0 || len > METADATA_BLOCK {
            return Err(MapBuildError::Structure(format!("metadata header at {pos} claims {len} bytes")));
        }
        out.push((pos + 2, len, h & META_STORED != 0));
        pos += 2 + len as u64;
    }
    if pos != t.bytes_used {
        return Err(MapBuildError::Structure(format!("metadata ends at {pos}, the filesystem at {}", t.bytes_used)));
    }
    Ok(out)
}

/// Maps every block of the finished image `image` (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn build_map(
    image: &File,
    image_size: u64,
    tables: &Tables,
    block_size: u32,
    compressor: Compressor,
    files: Vec<MappedFile<'_>>,
    fragments: &[FragmentBlock],
    record: &Record,
) -> Result<BlockMap, MapBuildError> {
    let structure = |why: String| MapBuildError::Structure(why);
    // offset -> (size, stored, kind)
    let mut located: BTreeMap<u64, (u32, bool, BlockKind)> = BTreeMap::new();
    for f in &files {
        let mut at = f.layout.blocks_start;
        for &w in &f.layout.block_sizes {
            let size = w & !STORED;
            if size == 0 {
                continue; // sparse
            }
            located.insert(at, (size, w & STORED != 0, BlockKind::Data));
            at += size as u64;
        }
    }
    for fr in fragments {
        located.insert(fr.offset, (fr.size & !STORED, fr.size & STORED != 0, BlockKind::Fragment));
    }
    for (offset, size, stored) in metadata_blocks(image, tables)? {
        located.insert(offset, (size, stored, BlockKind::Metadata));
    }

    let mut blocks = Vec::with_capacity(located.len());
    let mut index_of = HashMap::with_capacity(located.len());
    let mut buf = Vec::new();
    for (&offset, &(size, stored, kind)) in &located {
        if offset + size as u64 > tables.bytes_used
            || (kind != BlockKind::Metadata && offset >= tables.inode_table_start)
        {
            return Err(structure(format!("{kind:?} block at {offset} ({size} bytes) lies outside its area")));
        }
        buf.resize(size as usize, 0);
        image.read_exact_at(&mut buf, offset).map_err(MapBuildError::Read)?;
        let disk_sha256 = Sha256Digest::of_bytes(&buf);
        let (raw_sha256, raw_size) = match record.content(stored, &disk_sha256) {
            Some(c) => c,
            // Not produced by this build's packers: cannot happen, but the
            // map must hold the truth, so find out from the bytes.
            None if stored => (disk_sha256, size),
            None => {
                let limit = if kind == BlockKind::Metadata { METADATA_BLOCK } else { block_size };
                let raw = decompress_bounded(&buf, limit as usize)
                    .map_err(|e| structure(format!("block at {offset} does not decompress: {e}")))?;
                (Sha256Digest::of_bytes(&raw), raw.len() as u32)
            }
        };
        index_of.insert(offset, blocks.len() as u32);
        blocks.push(Block { offset, size, raw_size, kind, stored, raw_sha256, disk_sha256 });
    }

    let fragment_index: Vec<u32> = fragments
        .iter()
        .map(|fr| index_of.get(&fr.offset).copied().ok_or_else(|| structure(format!("fragment at {} lost", fr.offset))))
        .collect::<Result<_, _>>()?;
    drop(located);
    let mut mapped = Vec::with_capacity(files.len());
    for f in files {
        // The size words become block indexes in place: one list per file.
        let mut list = f.layout.block_sizes;
        let mut at = f.layout.blocks_start;
        for w in list.iter_mut() {
            let size = *w & !STORED;
            if size == 0 {
                *w = SPARSE;
                continue;
            }
            *w = index_of[&at];
            at += size as u64;
        }
        let tail = match f.layout.fragment {
            Some((idx, offset)) => {
                let block = *fragment_index.get(idx as usize).ok_or_else(|| {
                    structure(format!("fragment {idx} of {} does not exist", String::from_utf8_lossy(f.path)))
                })?;
                Some(Tail { block, offset })
            }
            None => None,
        };
        mapped.push(FileBlocks { path: f.path.to_vec(), size: f.layout.size, blocks: list, tail });
    }
    let map = BlockMap { compressor, block_size, image_size, blocks, files: mapped };
    // What the deployer will parse: check it here, where a bug can be reported.
    map.validate().map_err(|e| structure(e.to_string()))?;
    Ok(map)
}

/// Decompresses a block of at most `limit` bytes, whatever its length.
fn decompress_bounded(block: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    let mut d = zstd::bulk::Decompressor::new()?;
    d.decompress(block, limit)
}

/// Decompresses block `b` of `image` (the bytes at its offset), checking
/// both of its hashes.
pub fn read_block(image: &File, b: &Block) -> io::Result<Vec<u8>> {
    let mut disk = vec![0u8; b.size as usize];
    image.read_exact_at(&mut disk, b.offset)?;
    if Sha256Digest::of_bytes(&disk) != b.disk_sha256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("block at {} does not match its map", b.offset),
        ));
    }
    let raw = if b.stored { disk } else { decompress_block(&disk, b.raw_size as usize)? };
    if Sha256Digest::of_bytes(&raw) != b.raw_sha256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("block at {} decompresses to other bytes", b.offset),
        ));
    }
    Ok(raw)
}

/// Opens the earlier images of a repository whose blocks can be reused.
pub fn open_source(image: &Path, map: BlockMap, expected_size: u64, data_size: u64) -> io::Result<Source> {
    let file = File::open(image)?;
    let len = file.metadata()?.len();
    if len != expected_size || map.image_size != data_size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{len} bytes of which {} map, its manifest says {expected_size} of which {data_size} squashfs",
                map.image_size
            ),
        ));
    }
    Ok(Source { path: image.to_owned(), file, map })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_copied_only_into_blocks_of_their_kind() {
        // An earlier image holding one metadata block, compressed at the metadata level.
        let raw: Vec<u8> = (0..8192u32).map(|i| b"inode table "[(i * 7 % 12) as usize] ^ (i / 97) as u8).collect();
        let compressor = Compressor::identity(15);
        let (disk, stored) = BlockCompressor::new(compressor.metadata_level).unwrap().pack(&raw).unwrap();
        assert!(!stored);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.squashfs");
        std::fs::write(&path, &disk).unwrap();
        let block = Block {
            offset: 0,
            size: disk.len() as u32,
            raw_size: raw.len() as u32,
            kind: BlockKind::Metadata,
            stored: false,
            raw_sha256: Sha256Digest::of_bytes(&raw),
            disk_sha256: Sha256Digest::of_bytes(&disk),
        };
        let map = BlockMap {
            compressor,
            block_size: 131072,
            image_size: disk.len() as u64,
            blocks: vec![block],
            files: vec![],
        };
        let source = Source { path: path.clone(), file: File::open(&path).unwrap(), map };
        let (mut data, record) = Packer::new(compressor, ReuseIndex::new(vec![source], compressor)).unwrap();
        let mut out = vec![0u8; raw.len()];
        // A data block with that content is compressed at the data's level, not copied.
        let Packed::Compressed(n) = data.pack(&raw, &mut out).unwrap() else { panic!("stored") };
        assert_ne!(out[..n], disk[..], "level 15 gives other bytes");
        assert_eq!((record.stats().reused_blocks, record.stats().compressed_blocks), (0, 1));
        // Forked data packers too; the metadata packer copies it.
        data.fork().unwrap().pack(&raw, &mut out).unwrap();
        assert_eq!((record.stats().reused_blocks, record.stats().compressed_blocks), (0, 2));
        let mut metadata = data.for_metadata().unwrap();
        assert_eq!(metadata.pack(&raw, &mut out).unwrap(), Packed::Compressed(disk.len()));
        assert_eq!(out[..disk.len()], disk[..]);
        assert_eq!((record.stats().reused_blocks, record.stats().compressed_blocks), (1, 2));
        metadata.fork().unwrap().pack(&raw, &mut out).unwrap();
        assert_eq!(record.stats().reused_blocks, 2, "a fork of the metadata packer packs metadata");
    }
}
