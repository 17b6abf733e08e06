//! The block map of an image: where every compressed block of the squashfs
//! image is, what it holds, and which blocks make up each regular file.
//!
//! `imgbuild` writes it beside the image (`maps/<sha256>.map`, named in the
//! signed manifest) for two readers. The next build reuses the compressed
//! bytes of every block whose uncompressed content it finds in an earlier
//! image (incremental builds), and a deployer can rebuild a new image from
//! the blocks its old image already holds (static deltas). Both rely on the
//! hash of each block's uncompressed bytes and on [`crate::compress`]
//! reproducing the compressed bytes, which only holds for the compressor
//! identity the map records.
//!
//! A block is the bytes the compressor produced (or the raw bytes, when
//! stored). Metadata blocks are preceded on disk by their 2-byte squashfs
//! length header, which is not part of the block. The published form is a
//! zstd frame of a little-endian binary layout; [`BlockMap::decode`] is
//! bounded and fuzzed, as the map is untrusted until the manifest's sha256
//! of it has been checked.

use std::io::{self, Write};

use crate::compress::Compressor;
use crate::digest::Sha256Digest;

const MAGIC: &[u8; 8] = b"IMGMAP\x02\0";
const HEADER: usize = 8 + 4 * 4 + 8 + 4 * 2;
const BLOCK: usize = 8 + 4 + 4 + 1 + 1 + 32 + 32;
/// Largest squashfs metadata block (uncompressed).
pub const METADATA_BLOCK: u32 = 8192;
/// The most bytes a decoded map may take; a /usr of 5 GB needs about 20 MB.
pub const MAX_MAP_BYTES: usize = 256 << 20;
/// Marks a sparse (all-zero, not stored) block in a file's block list.
pub const SPARSE: u32 = u32::MAX;

/// Why a block map was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Not a zstd frame, or one that does not decode within the bounds.
    #[error("block map does not decompress: {0}")]
    Compression(String),
    /// The layout is not a valid map.
    #[error("block map is invalid: {0}")]
    Invalid(String),
}

fn invalid(why: impl Into<String>) -> MapError {
    MapError::Invalid(why.into())
}

/// Which part of the image a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// A block of one file's data.
    Data,
    /// A fragment block: the tails of several files packed together.
    Fragment,
    /// A metadata block (inodes, directories, fragment, id and xattr tables).
    Metadata,
}

impl BlockKind {
    fn code(self) -> u8 {
        match self {
            BlockKind::Data => 0,
            BlockKind::Fragment => 1,
            BlockKind::Metadata => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => BlockKind::Data,
            1 => BlockKind::Fragment,
            2 => BlockKind::Metadata,
            _ => return None,
        })
    }
}

/// One compressed (or stored) block of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Byte offset of the block in the image.
    pub offset: u64,
    /// Bytes on disk.
    pub size: u32,
    /// Bytes once decompressed.
    pub raw_size: u32,
    /// What it belongs to.
    pub kind: BlockKind,
    /// Stored uncompressed (compression did not shrink it).
    pub stored: bool,
    /// SHA-256 of the uncompressed bytes.
    pub raw_sha256: Sha256Digest,
    /// SHA-256 of the bytes on disk.
    pub disk_sha256: Sha256Digest,
}

/// A file's tail inside a fragment block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// Index of the fragment block in [`BlockMap::blocks`].
    pub block: u32,
    /// Offset of the tail in the fragment block's uncompressed bytes.
    pub offset: u32,
}

/// A regular file (one per inode: a hardlinked file appears once, under
/// its first name in tree order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBlocks {
    /// Path relative to the image root, without a leading `/`.
    pub path: Vec<u8>,
    /// File size.
    pub size: u64,
    /// Its full blocks in order: indexes into [`BlockMap::blocks`], or [`SPARSE`].
    pub blocks: Vec<u32>,
    /// Where its last partial block is, if it went into a fragment block.
    pub tail: Option<Tail>,
}

/// The block map of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    /// Who compressed the blocks.
    pub compressor: Compressor,
    /// Data block size of the image.
    pub block_size: u32,
    /// Size of the image file.
    pub image_size: u64,
    /// Every block, by increasing offset.
    pub blocks: Vec<Block>,
    /// Every regular file.
    pub files: Vec<FileBlocks>,
}

/// Counts for one kind of block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KindSummary {
    /// Blocks.
    pub blocks: u64,
    /// Of which stored uncompressed.
    pub stored: u64,
    /// Bytes on disk.
    pub disk_bytes: u64,
    /// Bytes uncompressed.
    pub raw_bytes: u64,
}

/// What `imgbuild inspect --blocks` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapSummary {
    /// The bundled zstd's version number that compressed the blocks.
    pub zstd_version: u32,
    /// zstd level of data and fragment blocks.
    pub level: u32,
    /// zstd level of metadata blocks.
    pub metadata_level: u32,
    /// Data block size.
    pub block_size: u32,
    /// Data blocks.
    pub data: KindSummary,
    /// Fragment blocks.
    pub fragment: KindSummary,
    /// Metadata blocks.
    pub metadata: KindSummary,
    /// Regular files (inodes).
    pub files: u64,
    /// Files whose tail is in a fragment block.
    pub files_with_tail: u64,
    /// Sparse (all-zero) blocks, not stored.
    pub sparse_blocks: u64,
    /// Blocks that hold the same uncompressed bytes as an earlier block.
    pub duplicate_blocks: u64,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], MapError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| invalid(format!("{what} is cut short")))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, MapError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, MapError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, MapError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, MapError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn digest(&mut self, what: &str) -> Result<Sha256Digest, MapError> {
        Ok(Sha256Digest(self.take(32, what)?.try_into().expect("32 bytes")))
    }
}

impl BlockMap {
    /// The uncompressed binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw_len());
        self.write_to(&mut out).expect("writing into memory cannot fail");
        out
    }

    /// Length of the uncompressed binary form.
    fn raw_len(&self) -> usize {
        let files: usize = self.files.iter().map(|f| 2 + f.path.len() + 8 + 4 + 4 * f.blocks.len() + 8).sum();
        HEADER + self.blocks.len() * BLOCK + files
    }

    /// Writes the uncompressed binary form.
    fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&self.compressor.zstd_version.to_le_bytes())?;
        out.write_all(&self.compressor.level.to_le_bytes())?;
        out.write_all(&self.compressor.metadata_level.to_le_bytes())?;
        out.write_all(&self.block_size.to_le_bytes())?;
        out.write_all(&self.image_size.to_le_bytes())?;
        out.write_all(&(self.blocks.len() as u32).to_le_bytes())?;
        out.write_all(&(self.files.len() as u32).to_le_bytes())?;
        for b in &self.blocks {
            out.write_all(&b.offset.to_le_bytes())?;
            out.write_all(&b.size.to_le_bytes())?;
            out.write_all(&b.raw_size.to_le_bytes())?;
            out.write_all(&[b.kind.code(), u8::from(b.stored)])?;
            out.write_all(&b.raw_sha256.0)?;
            out.write_all(&b.disk_sha256.0)?;
        }
        for f in &self.files {
            out.write_all(&(f.path.len() as u16).to_le_bytes())?;
            out.write_all(&f.path)?;
            out.write_all(&f.size.to_le_bytes())?;
            out.write_all(&(f.blocks.len() as u32).to_le_bytes())?;
            for b in &f.blocks {
                out.write_all(&b.to_le_bytes())?;
            }
            let (block, offset) = f.tail.map(|t| (t.block, t.offset)).unwrap_or((u32::MAX, 0));
            out.write_all(&block.to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
        }
        Ok(())
    }

    /// Parses and checks the uncompressed binary form: blocks in increasing,
    /// non-overlapping order inside the image, sizes within squashfs limits,
    /// and every file's block list consistent with its size.
    pub fn parse(b: &[u8]) -> Result<Self, MapError> {
        let mut c = Cursor { b, at: 0 };
        if c.take(8, "header")? != MAGIC {
            return Err(invalid("wrong magic (not an imgdeploy block map, or a newer format)"));
        }
        let compressor =
            Compressor { zstd_version: c.u32("header")?, level: c.u32("header")?, metadata_level: c.u32("header")? };
        let block_size = c.u32("header")?;
        let image_size = c.u64("header")?;
        let nblocks = c.u32("header")? as usize;
        let nfiles = c.u32("header")? as usize;
        check_header(block_size, compressor)?;
        if nblocks > (b.len() - HEADER) / BLOCK {
            return Err(invalid(format!("{nblocks} blocks do not fit in {} bytes", b.len())));
        }
        let mut blocks = Vec::with_capacity(nblocks);
        let mut end = 0u64;
        for i in 0..nblocks {
            let offset = c.u64("block")?;
            let size = c.u32("block")?;
            let raw_size = c.u32("block")?;
            let kind =
                BlockKind::from_code(c.u8("block")?).ok_or_else(|| invalid(format!("block {i} has no valid kind")))?;
            let stored = match c.u8("block")? {
                0 => false,
                1 => true,
                _ => return Err(invalid(format!("block {i} has an invalid stored flag"))),
            };
            let raw_sha256 = c.digest("block")?;
            let disk_sha256 = c.digest("block")?;
            let block = Block { offset, size, raw_size, kind, stored, raw_sha256, disk_sha256 };
            check_block(i, &block, block_size, image_size, &mut end)?;
            blocks.push(block);
        }
        let bs = block_size as u64;
        let mut files = Vec::with_capacity(nfiles.min(b.len() / 18));
        for i in 0..nfiles {
            let len = c.u16("file")? as usize;
            let path = c.take(len, "file")?.to_vec();
            check_path(i, &path)?;
            let size = c.u64("file")?;
            let n = c.u32("file")? as usize;
            if n > (b.len() - c.at) / 4 {
                return Err(invalid(format!("file {i} lists more blocks than the map holds")));
            }
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(c.u32("file")?);
            }
            let (tail_block, tail_offset) = (c.u32("file")?, c.u32("file")?);
            let tail = (tail_block != u32::MAX).then_some(Tail { block: tail_block, offset: tail_offset });
            let f = FileBlocks { path, size, blocks: list, tail };
            check_file(i, &f, &blocks, bs)?;
            files.push(f);
        }
        if c.at != b.len() {
            return Err(invalid(format!("{} bytes after the last file", b.len() - c.at)));
        }
        Ok(Self { compressor, block_size, image_size, blocks, files })
    }

    /// Checks what [`BlockMap::parse`] checks, on a map built in memory
    /// (without serialising it), plus what its binary form can hold.
    pub fn validate(&self) -> Result<(), MapError> {
        check_header(self.block_size, self.compressor)?;
        let mut end = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            check_block(i, b, self.block_size, self.image_size, &mut end)?;
        }
        for (i, f) in self.files.iter().enumerate() {
            check_path(i, &f.path)?;
            check_file(i, f, &self.blocks, self.block_size as u64)?;
        }
        Ok(())
    }

    /// The published form: a zstd frame. Level 6: the hashes that make up
    /// most of a map do not compress, and level 19 would take 15 times as
    /// long and 50 MiB more memory for a map 10% smaller.
    /// Streamed: a /usr map is 20 MB uncompressed, never held whole.
    pub fn encode(&self) -> Vec<u8> {
        let encode = || -> io::Result<Vec<u8>> {
            let mut z = zstd::stream::write::Encoder::new(Vec::new(), 6)?;
            z.set_pledged_src_size(Some(self.raw_len() as u64))?;
            z.include_contentsize(true)?;
            let mut w = io::BufWriter::with_capacity(64 << 10, z);
            self.write_to(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.finish()
        };
        encode().expect("compressing into memory cannot fail")
    }

    /// Decompresses (at most [`MAX_MAP_BYTES`], with a bounded window) and parses.
    pub fn decode(compressed: &[u8]) -> Result<Self, MapError> {
        Self::decode_within(compressed, MAX_MAP_BYTES)
    }

    /// [`BlockMap::decode`] with another bound (the tests use a small one).
    fn decode_within(compressed: &[u8], limit: usize) -> Result<Self, MapError> {
        let raw = crate::compress::decode_bounded(compressed, limit).map_err(MapError::Compression)?;
        Self::parse(&raw)
    }

    /// Counts by kind, for `imgbuild inspect --blocks`.
    pub fn summary(&self) -> MapSummary {
        let mut s = MapSummary {
            zstd_version: self.compressor.zstd_version,
            level: self.compressor.level,
            metadata_level: self.compressor.metadata_level,
            block_size: self.block_size,
            files: self.files.len() as u64,
            ..MapSummary::default()
        };
        let mut seen = std::collections::HashSet::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let k = match b.kind {
                BlockKind::Data => &mut s.data,
                BlockKind::Fragment => &mut s.fragment,
                BlockKind::Metadata => &mut s.metadata,
            };
            k.blocks += 1;
            k.stored += u64::from(b.stored);
            k.disk_bytes += b.size as u64;
            k.raw_bytes += b.raw_size as u64;
            if !seen.insert(b.raw_sha256) {
                s.duplicate_blocks += 1;
            }
        }
        for f in &self.files {
            s.files_with_tail += u64::from(f.tail.is_some());
            s.sparse_blocks += f.blocks.iter().filter(|&&b| b == SPARSE).count() as u64;
        }
        s
    }
}

fn check_header(block_size: u32, compressor: Compressor) -> Result<(), MapError> {
    if !(4096..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(invalid(format!("block size {block_size} is not a squashfs block size")));
    }
    compressor.check_levels().map_err(invalid)
}

/// Sizes within squashfs limits, after the previous block (`end`), inside the image.
fn check_block(i: usize, b: &Block, block_size: u32, image_size: u64, end: &mut u64) -> Result<(), MapError> {
    let limit = if b.kind == BlockKind::Metadata { METADATA_BLOCK } else { block_size };
    let sane_size = if b.stored { b.size == b.raw_size } else { b.size < b.raw_size };
    if b.size == 0 || b.raw_size > limit || !sane_size {
        return Err(invalid(format!("block {i} has {} bytes for {} uncompressed", b.size, b.raw_size)));
    }
    match b.offset.checked_add(b.size as u64).filter(|&e| e <= image_size) {
        Some(e) if b.offset >= *end => *end = e,
        _ => return Err(invalid(format!("block {i} at {} overlaps another or lies outside the image", b.offset))),
    }
    Ok(())
}

fn check_path(i: usize, path: &[u8]) -> Result<(), MapError> {
    if path.is_empty() || path.len() > u16::MAX as usize || path.contains(&0) || path.starts_with(b"/") {
        return Err(invalid(format!("file {i} has an invalid path")));
    }
    Ok(())
}

/// A file's blocks must be data blocks of the right sizes, and its tail
/// must lie inside a fragment block.
fn check_file(i: usize, f: &FileBlocks, blocks: &[Block], bs: u64) -> Result<(), MapError> {
    check_file_blocks(f, blocks, bs)
        .map_err(|why| invalid(format!("file {i} ({}): {why}", String::from_utf8_lossy(&f.path))))
}

fn check_file_blocks(f: &FileBlocks, blocks: &[Block], bs: u64) -> Result<(), String> {
    let full = f.size / bs;
    let rest = f.size % bs;
    let expected_blocks = if f.tail.is_some() { full } else { full + u64::from(rest > 0) };
    if f.blocks.len() as u64 != expected_blocks || (f.tail.is_some() && rest == 0) {
        return Err(format!("{} blocks and a tail: {}, for {} bytes", f.blocks.len(), f.tail.is_some(), f.size));
    }
    for (j, &idx) in f.blocks.iter().enumerate() {
        let want = if (j as u64) < full { bs } else { rest };
        if idx == SPARSE {
            continue;
        }
        let b = blocks.get(idx as usize).ok_or_else(|| format!("block {idx} does not exist"))?;
        if b.kind != BlockKind::Data || b.raw_size as u64 != want {
            return Err(format!("block {idx} is not a data block of {want} bytes"));
        }
    }
    if let Some(t) = f.tail {
        let b = blocks.get(t.block as usize).ok_or_else(|| format!("fragment block {} does not exist", t.block))?;
        if b.kind != BlockKind::Fragment || t.offset as u64 + rest > b.raw_size as u64 {
            return Err(format!("its tail is not inside fragment block {}", t.block));
        }
    }
    Ok(())
}

/// Directory, relative to the manifest, of the content-addressed block maps.
pub const MAPS_DIR: &str = "maps";

/// The relative path a block map with this digest is published under.
pub fn map_path(sha256: &Sha256Digest) -> String {
    format!("{MAPS_DIR}/{sha256}.map")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Sha256Digest {
        Sha256Digest([n; 32])
    }

    fn sample() -> BlockMap {
        let block = |offset, size, raw_size, kind, stored, n| Block {
            offset,
            size,
            raw_size,
            kind,
            stored,
            raw_sha256: digest(n),
            disk_sha256: digest(n + 100),
        };
        BlockMap {
            compressor: Compressor { zstd_version: 10507, level: 15, metadata_level: 3 },
            block_size: 131072,
            image_size: 1 << 20,
            blocks: vec![
                block(96, 1000, 131072, BlockKind::Data, false, 1),
                block(1096, 131072, 131072, BlockKind::Data, true, 2),
                block(132168, 500, 700, BlockKind::Data, false, 3),
                block(132668, 300, 4000, BlockKind::Fragment, false, 4),
                block(140000, 2000, 8192, BlockKind::Metadata, false, 5),
                block(142002, 90, 90, BlockKind::Metadata, true, 6),
            ],
            files: vec![
                FileBlocks {
                    path: b"a/big".to_vec(),
                    size: 3 * 131072 + 10,
                    blocks: vec![0, SPARSE, 1],
                    tail: Some(Tail { block: 3, offset: 0 }),
                },
                FileBlocks { path: b"a/own-tail".to_vec(), size: 131072 + 700, blocks: vec![0, 2], tail: None },
                FileBlocks {
                    path: b"small".to_vec(),
                    size: 20,
                    blocks: vec![],
                    tail: Some(Tail { block: 3, offset: 3980 }),
                },
                FileBlocks { path: b"empty".to_vec(), size: 0, blocks: vec![], tail: None },
            ],
        }
    }

    #[test]
    fn round_trips_and_summarises() {
        let m = sample();
        assert_eq!(BlockMap::parse(&m.to_bytes()).unwrap(), m);
        assert_eq!(m.to_bytes().len(), m.raw_len());
        assert_eq!(BlockMap::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.encode(), m.encode(), "the published form is reproducible");
        m.validate().unwrap();
        let mut long = m.clone();
        long.files[0].path = vec![b'a'; 65535];
        long.validate().unwrap();
        assert_eq!(BlockMap::parse(&long.to_bytes()).unwrap(), long);
        long.files[0].path.push(b'a');
        assert!(long.validate().unwrap_err().to_string().contains("invalid path"));
        let s = m.summary();
        assert_eq!((s.zstd_version, s.level, s.metadata_level, s.block_size), (10507, 15, 3, 131072));
        assert_eq!((s.data.blocks, s.data.stored, s.data.disk_bytes, s.data.raw_bytes), (3, 1, 132572, 262844));
        assert_eq!((s.fragment.blocks, s.metadata.blocks, s.metadata.stored), (1, 2, 1));
        assert_eq!((s.files, s.files_with_tail, s.sparse_blocks, s.duplicate_blocks), (4, 2, 1, 0));
        let mut dup = m.clone();
        dup.blocks[5].raw_sha256 = digest(1);
        assert_eq!(dup.summary().duplicate_blocks, 1);
        assert_eq!(map_path(&digest(0)), format!("maps/{}.map", digest(0)));
    }

    #[test]
    fn accepts_the_limits() {
        let mut m = sample();
        // The last block may end exactly at the end of the image.
        m.image_size = 142002 + 90;
        m.block_size = 131072;
        assert_eq!(BlockMap::parse(&m.to_bytes()).unwrap(), m);
        for (bs, level, metadata_level) in [(4096, 1, 22), (1 << 20, 22, 1)] {
            let m = BlockMap {
                block_size: bs,
                compressor: Compressor { zstd_version: 1, level, metadata_level },
                blocks: vec![],
                files: vec![],
                image_size: 0,
            };
            assert_eq!(BlockMap::parse(&m.to_bytes()).unwrap(), m);
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let good = sample().to_bytes();
        let mut files = good.clone();
        files[HEADER - 4..HEADER].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BlockMap::parse(&files).unwrap_err().to_string().contains("cut short"));
        // The first file's block count.
        let at = HEADER + 6 * BLOCK + 2 + b"a/big".len() + 8;
        assert_eq!(&good[at..at + 4], &3u32.to_le_bytes());
        let mut list = good;
        list[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BlockMap::parse(&list).unwrap_err().to_string().contains("lists more blocks"));
    }

    #[test]
    fn counts_are_bounded_by_exactly_what_the_bytes_can_hold() {
        // Block count: one more than the bytes after the header can hold is
        // refused up front; the padding puts the limit where a careless
        // bound (plus instead of minus, times instead of divided by) would pass it.
        let mut b = sample().to_bytes();
        while (b.len() - HEADER) % BLOCK < 10 {
            b.push(0);
        }
        let fit = ((b.len() - HEADER) / BLOCK) as u32;
        b[HEADER - 8..HEADER - 4].copy_from_slice(&(fit + 1).to_le_bytes());
        assert!(BlockMap::parse(&b).unwrap_err().to_string().contains("do not fit"));
        // A file's block count: exactly what the rest holds is not refused up
        // front (it fails later, cut short); one more is.
        let good = sample().to_bytes();
        let at = HEADER + 6 * BLOCK + 2 + b"a/big".len() + 8;
        let rest = ((good.len() - at - 4) / 4) as u32;
        for (count, needle) in [(rest, "cut short"), (rest + 1, "lists more blocks")] {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&count.to_le_bytes());
            let err = BlockMap::parse(&b).unwrap_err().to_string();
            assert!(err.contains(needle), "{count}: {err}");
        }
    }

    #[test]
    fn decompression_bombs_are_refused() {
        // At a 1 MiB bound (decode uses the same code at MAX_MAP_BYTES; a
        // 256 MiB test would cost every mutant of this crate a second).
        // Exactly the limit decodes (and then fails as a map, not as a bomb).
        const LIMIT: usize = 1 << 20;
        let full = zstd::bulk::compress(&vec![0u8; LIMIT], 3).unwrap();
        assert!(matches!(BlockMap::decode_within(&full, LIMIT), Err(MapError::Invalid(m)) if m.contains("magic")));
        let bomb = zstd::bulk::compress(&vec![0u8; LIMIT + 1024], 3).unwrap();
        let r = BlockMap::decode_within(&bomb, LIMIT);
        assert!(matches!(&r, Err(MapError::Compression(m)) if m.contains("beyond the 1048576-byte")), "{r:?}");
        // decode itself takes that frame: it is within MAX_MAP_BYTES.
        assert!(matches!(BlockMap::decode(&bomb), Err(MapError::Invalid(_))));
        let mut wide = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        wide.window_log(27).unwrap();
        std::io::Write::write_all(&mut wide, &vec![7u8; 1 << 20]).unwrap();
        assert!(matches!(BlockMap::decode(&wide.finish().unwrap()), Err(MapError::Compression(_))));
    }

    #[test]
    fn refuses_inconsistent_maps() {
        let bad = |f: &dyn Fn(&mut BlockMap), needle: &str| {
            let mut m = sample();
            f(&mut m);
            let err = BlockMap::parse(&m.to_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
            assert_eq!(m.validate().unwrap_err().to_string(), err, "validate and parse disagree");
        };
        bad(&|m| m.blocks[1].offset = 1000, "overlaps");
        bad(&|m| m.blocks[5].offset = (1 << 20) - 10, "outside the image");
        bad(&|m| m.blocks[0].size = 0, "0 bytes");
        bad(&|m| m.blocks[0].size = 131072, "131072 bytes for 131072");
        bad(&|m| m.blocks[1].size = 100, "100 bytes for 131072");
        bad(&|m| m.blocks[4].raw_size = 8193, "for 8193");
        bad(&|m| m.blocks[0].raw_size = 131073, "for 131073");
        bad(&|m| m.block_size = 1000, "not a squashfs block size");
        bad(&|m| m.block_size = 3 << 12, "not a squashfs block size");
        bad(&|m| m.block_size = 1 << 21, "not a squashfs block size");
        bad(&|m| m.compressor.level = 0, "level 0");
        bad(&|m| m.compressor.level = 23, "level 23");
        bad(&|m| m.compressor.metadata_level = 0, "metadata zstd level 0");
        bad(&|m| m.compressor.metadata_level = 23, "metadata zstd level 23");
        bad(&|m| m.files[0].blocks.pop().map(|_| ()).unwrap(), "2 blocks");
        bad(&|m| m.files[0].blocks[0] = 9, "block 9 does not exist");
        bad(&|m| m.files[0].blocks[0] = 3, "not a data block");
        bad(&|m| m.files[1].blocks[1] = 0, "not a data block of 700");
        bad(&|m| m.files[0].tail = Some(Tail { block: 0, offset: 0 }), "not inside fragment block 0");
        bad(&|m| m.files[2].tail = Some(Tail { block: 3, offset: 3981 }), "not inside");
        bad(&|m| m.files[2].tail = Some(Tail { block: 7, offset: 0 }), "fragment block 7 does not exist");
        bad(&|m| m.files[3].tail = Some(Tail { block: 3, offset: 0 }), "a tail: true");
        bad(&|m| m.files[0].path = b"/abs".to_vec(), "invalid path");
        bad(&|m| m.files[0].path = b"a\0b".to_vec(), "invalid path");
        bad(&|m| m.files[0].path.clear(), "invalid path");
        let good = sample().to_bytes();
        for cut in [0, 7, HEADER - 1, HEADER + BLOCK - 1, good.len() - 1] {
            assert!(BlockMap::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(BlockMap::parse(&extra).unwrap_err().to_string().contains("after the last file"));
        let mut kind = good.clone();
        kind[HEADER + 16] = 3;
        assert!(BlockMap::parse(&kind).unwrap_err().to_string().contains("no valid kind"));
        let mut stored = good.clone();
        stored[HEADER + 17] = 2;
        assert!(BlockMap::parse(&stored).unwrap_err().to_string().contains("stored flag"));
        let mut magic = good.clone();
        magic[6] = 1;
        assert!(
            BlockMap::parse(&magic).unwrap_err().to_string().contains("magic"),
            "the format before metadata levels"
        );
        let mut many = good;
        many[HEADER - 8..HEADER - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(BlockMap::parse(&many).unwrap_err().to_string().contains("do not fit"));
        assert!(BlockMap::decode(b"not zstd").unwrap_err().to_string().contains("not a zstd frame"));
    }
}
