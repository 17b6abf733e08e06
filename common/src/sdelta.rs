//! Static deltas: a file, made by CI, that turns one published image into
//! the next on a host that holds the first.
//!
//! The chunk-index delta ([`crate::chunk`]) can only reuse compressed bytes
//! the host already has: a 4 KiB edit re-sends the whole compressed block
//! around it, and a change that shifts file data rewrites `blocks_start` in
//! most inodes, so most metadata blocks come down again. A static delta
//! works on uncompressed bytes instead, as OSTree's static deltas and
//! Android's update_engine do: a changed block is a patch against
//! uncompressed blocks of the old image, and the host recompresses the
//! result with the builder's own compressor ([`crate::compress`], whose
//! identity the delta records), which reproduces the published bytes.
//!
//! A delta covers the squashfs part of the new image (the dm-verity tail is
//! computed from it) as ops in output order:
//! - **copy** bytes from the old image (unchanged blocks; `copy_file_range`,
//!   so XFS and btrfs share the extents);
//! - **patch** one block: its uncompressed bytes from up to [`MAX_REFS`]
//!   old blocks, by a bsdiff patch (metadata, where many bytes change by a
//!   little) or a zstd frame that uses them as its prefix (data, where
//!   bsdiff's suffix sort costs too much), recompressed, and checked
//!   against the sha256 of the published bytes the op carries;
//! - **literal** bytes (superblock, table headers, and blocks a patch does
//!   not pay for).
//!
//! The file is one zstd frame; the manifest signs its sha256 and size, and
//! nothing here runs before that check. The decoder is still bounded
//! (fuzzed). A block that does not reproduce (another zstd, a damaged old
//! block) is not an error: [`apply`] reports its region, and the caller
//! fetches the chunks around it by Range. Copies are checked the same way,
//! by the signed chunk index, after the delta is applied.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;

use crate::compress::{BlockCompressor, BlockDecompressor, Compressor};
use crate::digest::Sha256Digest;

const MAGIC: &[u8; 8] = b"IMGDLT\x02\0";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// How a zstd dictionary starts (`ZSTD_MAGIC_DICTIONARY`).
const ZSTD_DICT_MAGIC: [u8; 4] = [0x37, 0xa4, 0x30, 0xec];
/// The zstd window a delta may ask for (32 MiB; level 19 uses 8 MiB).
const WINDOW_LOG_MAX: u32 = 25;
/// Longest literal op; longer runs are split.
pub const MAX_LITERAL: u32 = 1 << 20;
/// Largest squashfs block, compressed or not.
pub const MAX_BLOCK: u32 = 1 << 20;
/// Most old blocks one patch reads.
pub const MAX_REFS: usize = 4;
/// Largest patch of one block: bsdiff's worst case is every new byte as
/// extra data plus a 24-byte control record per match.
pub const MAX_PATCH: u32 = 4 * MAX_BLOCK;
/// zstd level of the delta file itself.
pub const FILE_LEVEL: i32 = 19;

const OP_END: u8 = 0;
const OP_COPY: u8 = 1;
const OP_LITERAL: u8 = 2;
const OP_PATCH: u8 = 3;

/// Why a delta file was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeltaFileError {
    /// The layout is not a valid delta.
    #[error("static delta is invalid: {0}")]
    Invalid(String),
    /// Reading or decompressing it failed.
    #[error("static delta cannot be read")]
    Read(#[source] io::Error),
}

fn invalid(why: impl Into<String>) -> DeltaFileError {
    DeltaFileError::Invalid(why.into())
}

/// Why [`apply`] stopped (a block that does not reproduce is not an error).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The delta itself.
    #[error(transparent)]
    File(#[from] DeltaFileError),
    /// Writing the new image.
    #[error("cannot write the image being assembled")]
    Write(#[source] io::Error),
}

/// What a delta turns into what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// sha256 of the old image (the whole file).
    pub from: Sha256Digest,
    /// sha256 of the new image (the whole file).
    pub to: Sha256Digest,
    /// Bytes the ops produce: the new image's squashfs part.
    pub out_size: u64,
    /// The compressor that reproduces patched blocks.
    pub compressor: Compressor,
}

/// A block of the old image a patch reads (uncompressed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldBlock {
    /// Offset in the old image.
    pub offset: u64,
    /// Bytes on disk.
    pub size: u32,
    /// Bytes uncompressed.
    pub raw_size: u32,
    /// Stored uncompressed.
    pub stored: bool,
}

/// The block a patch makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBlock {
    /// Bytes on disk.
    pub size: u32,
    /// Bytes uncompressed.
    pub raw_size: u32,
    /// Stored uncompressed.
    pub stored: bool,
    /// A metadata block: recompressed at the compressor's metadata level.
    pub metadata: bool,
    /// sha256 of the bytes on disk.
    pub sha256: Sha256Digest,
}

/// How a patch turns its base (the old blocks, concatenated uncompressed)
/// into the new block's uncompressed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// A bsdiff patch: small where many bytes change by a little (inodes
    /// whose data moved), but its suffix sort is slow on large bases.
    Bsdiff,
    /// A zstd frame compressed with the base as its prefix (zstd's
    /// `--patch-from`): fast, and small for edits, inserts and deletes.
    Zstd,
}

impl PatchKind {
    fn code(self) -> u8 {
        match self {
            PatchKind::Bsdiff => 0,
            PatchKind::Zstd => 1,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(PatchKind::Bsdiff),
            1 => Some(PatchKind::Zstd),
            _ => None,
        }
    }
}

/// zstd level of [`PatchKind::Zstd`] patches.
const ZSTD_PATCH_LEVEL: i32 = 6;

/// One step of a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `len` bytes of the old image from `offset`.
    Copy {
        /// Offset in the old image.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// These bytes.
    Literal(Vec<u8>),
    /// One block made from old blocks.
    Patch {
        /// What it must come out as.
        block: NewBlock,
        /// The old blocks, concatenated uncompressed, the patch applies to.
        refs: Vec<OldBlock>,
        /// How the patch applies.
        kind: PatchKind,
        /// The patch.
        patch: Vec<u8>,
    },
}

impl Op {
    /// Bytes of the new image the op produces.
    pub fn out_len(&self) -> u64 {
        match self {
            Op::Copy { len, .. } => *len,
            Op::Literal(b) => b.len() as u64,
            Op::Patch { block, .. } => block.size as u64,
        }
    }
}

fn check_block(size: u32, raw_size: u32, stored: bool, what: &str) -> Result<(), DeltaFileError> {
    if size == 0 || raw_size > MAX_BLOCK || (stored && size != raw_size) || (!stored && size >= raw_size) {
        return Err(invalid(format!(
            "{what} of {size} bytes ({raw_size} uncompressed, stored: {stored}) is impossible"
        )));
    }
    Ok(())
}

/// Writes a delta file: the header, then ops, then [`DeltaWriter::finish`].
pub struct DeltaWriter<W: Write> {
    enc: zstd::stream::write::Encoder<'static, W>,
    out_size: u64,
    produced: u64,
}

impl<W: Write> DeltaWriter<W> {
    /// Starts a delta described by `header`.
    pub fn new(w: W, header: &Header) -> io::Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(w, FILE_LEVEL)?;
        enc.write_all(MAGIC)?;
        enc.write_all(&header.from.0)?;
        enc.write_all(&header.to.0)?;
        enc.write_all(&header.out_size.to_le_bytes())?;
        enc.write_all(&header.compressor.zstd_version.to_le_bytes())?;
        enc.write_all(&header.compressor.level.to_le_bytes())?;
        enc.write_all(&header.compressor.metadata_level.to_le_bytes())?;
        Ok(Self { enc, out_size: header.out_size, produced: 0 })
    }

    /// Appends `op`; refuses one the reader would refuse.
    pub fn push(&mut self, op: &Op) -> io::Result<()> {
        let e = &mut self.enc;
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if self.produced + op.out_len() > self.out_size {
            return Err(bad(format!("op past the end of the {}-byte output", self.out_size)));
        }
        match op {
            Op::Copy { offset, len } => {
                if *len == 0 {
                    return Err(bad("empty copy".into()));
                }
                e.write_all(&[OP_COPY])?;
                e.write_all(&offset.to_le_bytes())?;
                e.write_all(&len.to_le_bytes())?;
            }
            Op::Literal(bytes) => {
                if bytes.is_empty() || bytes.len() > MAX_LITERAL as usize {
                    return Err(bad(format!("literal of {} bytes", bytes.len())));
                }
                e.write_all(&[OP_LITERAL])?;
                e.write_all(&(bytes.len() as u32).to_le_bytes())?;
                e.write_all(bytes)?;
            }
            Op::Patch { block, refs, kind, patch } => {
                check_block(block.size, block.raw_size, block.stored, "a patched block").map_err(io::Error::other)?;
                if refs.is_empty() || refs.len() > MAX_REFS || patch.len() > MAX_PATCH as usize {
                    return Err(bad(format!("patch with {} refs and {} bytes", refs.len(), patch.len())));
                }
                e.write_all(&[OP_PATCH])?;
                e.write_all(&block.size.to_le_bytes())?;
                e.write_all(&block.raw_size.to_le_bytes())?;
                e.write_all(&[u8::from(block.stored), u8::from(block.metadata), refs.len() as u8, kind.code()])?;
                e.write_all(&block.sha256.0)?;
                for r in refs {
                    check_block(r.size, r.raw_size, r.stored, "an old block").map_err(io::Error::other)?;
                    e.write_all(&r.offset.to_le_bytes())?;
                    e.write_all(&r.size.to_le_bytes())?;
                    e.write_all(&r.raw_size.to_le_bytes())?;
                    e.write_all(&[u8::from(r.stored)])?;
                }
                e.write_all(&(patch.len() as u32).to_le_bytes())?;
                e.write_all(patch)?;
            }
        }
        self.produced += op.out_len();
        Ok(())
    }

    /// Ends the delta; the ops must have produced exactly `out_size` bytes.
    pub fn finish(mut self) -> io::Result<W> {
        if self.produced != self.out_size {
            return Err(io::Error::other(format!("ops produce {} of {} bytes", self.produced, self.out_size)));
        }
        self.enc.write_all(&[OP_END])?;
        self.enc.finish()
    }
}

/// Reads a delta file op by op, in bounded memory.
pub struct DeltaReader<R: Read> {
    dec: zstd::stream::read::Decoder<'static, BufReader<R>>,
    header: Header,
    produced: u64,
    ended: bool,
}

impl<R: Read> std::fmt::Debug for DeltaReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaReader").field("header", &self.header).field("produced", &self.produced).finish()
    }
}

impl<R: Read> DeltaReader<R> {
    /// Opens a delta and reads its header.
    pub fn new(r: R) -> Result<Self, DeltaFileError> {
        let mut r = BufReader::new(r);
        let head = io::BufRead::fill_buf(&mut r).map_err(DeltaFileError::Read)?;
        if !head.starts_with(&ZSTD_MAGIC) {
            return Err(invalid("not a zstd frame"));
        }
        let mut dec = zstd::stream::read::Decoder::with_buffer(r).map_err(DeltaFileError::Read)?;
        dec.window_log_max(WINDOW_LOG_MAX).map_err(DeltaFileError::Read)?;
        let mut me = Self {
            dec,
            header: Header {
                from: Sha256Digest([0; 32]),
                to: Sha256Digest([0; 32]),
                out_size: 0,
                compressor: Compressor { zstd_version: 0, level: 0, metadata_level: 0 },
            },
            produced: 0,
            ended: false,
        };
        if me.bytes::<8>("header")? != *MAGIC {
            return Err(invalid("wrong magic (not an imgdeploy static delta, or a newer format)"));
        }
        me.header.from = Sha256Digest(me.bytes("header")?);
        me.header.to = Sha256Digest(me.bytes("header")?);
        me.header.out_size = me.u64("header")?;
        me.header.compressor =
            Compressor { zstd_version: me.u32("header")?, level: me.u32("header")?, metadata_level: me.u32("header")? };
        me.header.compressor.check_levels().map_err(invalid)?;
        Ok(me)
    }

    /// What the delta turns into what.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), DeltaFileError> {
        self.dec.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => invalid(format!("{what} is cut short")),
            _ => DeltaFileError::Read(e),
        })
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DeltaFileError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }
    fn u8(&mut self, what: &str) -> Result<u8, DeltaFileError> {
        Ok(self.bytes::<1>(what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, DeltaFileError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DeltaFileError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn flag(&mut self, what: &str, name: &str) -> Result<bool, DeltaFileError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            f => Err(invalid(format!("{what} has {name} flag {f}"))),
        }
    }
    fn vec(&mut self, len: usize, what: &str) -> Result<Vec<u8>, DeltaFileError> {
        let mut v = Vec::new();
        let got = (&mut self.dec).take(len as u64).read_to_end(&mut v).map_err(DeltaFileError::Read)?;
        if got != len {
            return Err(invalid(format!("{what} is cut short")));
        }
        Ok(v)
    }

    /// The next op, or `None` after the last (checked to end the output
    /// exactly, with nothing after it).
    pub fn next_op(&mut self) -> Result<Option<Op>, DeltaFileError> {
        if self.ended {
            return Ok(None);
        }
        let op = match self.u8("an op")? {
            OP_END => {
                if self.produced != self.header.out_size {
                    return Err(invalid(format!(
                        "it ends after {} of the {} bytes it makes",
                        self.produced, self.header.out_size
                    )));
                }
                let mut more = [0u8; 1];
                if self.dec.read(&mut more).map_err(DeltaFileError::Read)? != 0 {
                    return Err(invalid("bytes follow its end"));
                }
                self.ended = true;
                return Ok(None);
            }
            OP_COPY => {
                let (offset, len) = (self.u64("a copy")?, self.u64("a copy")?);
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(invalid(format!("a copy of {len} bytes from {offset}")));
                }
                Op::Copy { offset, len }
            }
            OP_LITERAL => {
                let len = self.u32("a literal")?;
                if len == 0 || len > MAX_LITERAL {
                    return Err(invalid(format!("a literal of {len} bytes")));
                }
                Op::Literal(self.vec(len as usize, "a literal")?)
            }
            OP_PATCH => {
                let (size, raw_size) = (self.u32("a patch")?, self.u32("a patch")?);
                let stored = self.flag("a patch", "stored")?;
                let metadata = self.flag("a patch", "metadata")?;
                let nrefs = self.u8("a patch")? as usize;
                let code = self.u8("a patch")?;
                check_block(size, raw_size, stored, "a patched block")?;
                if nrefs == 0 || nrefs > MAX_REFS {
                    return Err(invalid(format!("a patch reads {nrefs} old blocks")));
                }
                let kind = PatchKind::from_code(code).ok_or_else(|| invalid(format!("unknown patch kind {code}")))?;
                let sha256 = Sha256Digest(self.bytes("a patch")?);
                let mut refs = Vec::with_capacity(nrefs);
                for _ in 0..nrefs {
                    let r = OldBlock {
                        offset: self.u64("a patch")?,
                        size: self.u32("a patch")?,
                        raw_size: self.u32("a patch")?,
                        stored: self.flag("a patch", "stored")?,
                    };
                    check_block(r.size, r.raw_size, r.stored, "an old block")?;
                    refs.push(r);
                }
                let len = self.u32("a patch")?;
                if len > MAX_PATCH {
                    return Err(invalid(format!("a patch of {len} bytes")));
                }
                let patch = self.vec(len as usize, "a patch")?;
                Op::Patch { block: NewBlock { size, raw_size, stored, metadata, sha256 }, refs, kind, patch }
            }
            t => return Err(invalid(format!("unknown op {t}"))),
        };
        if op.out_len() > self.header.out_size - self.produced {
            return Err(invalid(format!("an op runs past the {}-byte output", self.header.out_size)));
        }
        self.produced += op.out_len();
        Ok(Some(op))
    }
}

/// Reads one old block's uncompressed bytes; `None` if the old image does
/// not hold a block like that there (damaged, or another image).
pub fn read_old_block(old: &File, b: &OldBlock, unpack: &mut BlockDecompressor) -> Option<Vec<u8>> {
    let mut disk = vec![0u8; b.size as usize];
    old.read_exact_at(&mut disk, b.offset).ok()?;
    if b.stored {
        return Some(disk);
    }
    unpack.unpack(&disk, b.raw_size as usize).ok()
}

/// Makes the on-disk bytes of a patched block from its old blocks'
/// uncompressed bytes (concatenated): `None` unless they come out with the
/// signed sha256. The builder checks every patch it writes with this.
pub fn reproduce_block(
    base: &[u8],
    kind: PatchKind,
    patch: &[u8],
    block: &NewBlock,
    (comp, unpatch): (&mut BlockCompressor, &mut Unpatcher),
) -> Option<Vec<u8>> {
    let raw = unpatch.unpatch(base, kind, patch, block.raw_size)?;
    let (disk, stored) = if block.stored { (raw, true) } else { comp.pack(&raw).ok()? };
    (stored == block.stored && Sha256Digest::of_bytes(&disk) == block.sha256).then_some(disk)
}

/// Undoes patches, with one zstd context for every block of a worker.
pub struct Unpatcher(zstd::zstd_safe::DCtx<'static>);

impl Unpatcher {
    /// A fresh context.
    pub fn new() -> io::Result<Self> {
        let ctx =
            zstd::zstd_safe::DCtx::try_create().ok_or_else(|| io::Error::other("no memory for a zstd context"))?;
        Ok(Self(ctx))
    }

    /// The uncompressed bytes `patch` makes from `base`, if exactly `raw_size` of them.
    pub fn unpatch(&mut self, base: &[u8], kind: PatchKind, patch: &[u8], raw_size: u32) -> Option<Vec<u8>> {
        let mut raw = Vec::with_capacity(raw_size as usize);
        match kind {
            PatchKind::Bsdiff => bsdiff::patch(base, &mut &patch[..], &mut raw).ok()?,
            // zstd reads a base that starts like a zstd dictionary as one,
            // where the patch's writer took it as raw bytes (a prefix): the
            // stream decoder is told so.
            PatchKind::Zstd if base.starts_with(&ZSTD_DICT_MAGIC) => {
                let mut d = zstd::stream::read::Decoder::with_ref_prefix(patch, base).ok()?;
                d.window_log_max(WINDOW_LOG_MAX).ok()?;
                d.take(raw_size as u64 + 1).read_to_end(&mut raw).ok()?;
            }
            // All in one call, into at most `raw_size` bytes: the window is
            // the output, so a frame asking for a larger one costs nothing.
            PatchKind::Zstd => {
                self.0.decompress_using_dict(&mut raw, patch, base).ok()?;
            }
        }
        (raw.len() == raw_size as usize).then_some(raw)
    }
}

/// Makes a patch of `kind` turning `base` into `new`.
pub fn make_patch(kind: PatchKind, base: &[u8], new: &[u8]) -> Vec<u8> {
    let mut patch = Vec::new();
    match kind {
        PatchKind::Bsdiff => bsdiff::diff(base, new, &mut patch).expect("writing into memory cannot fail"),
        PatchKind::Zstd => {
            let made = (|| {
                let mut e = zstd::stream::write::Encoder::with_ref_prefix(&mut patch, ZSTD_PATCH_LEVEL, base)?;
                e.write_all(new)?;
                e.finish().map(drop)
            })();
            made.expect("compressing into memory cannot fail");
        }
    }
    patch
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Bytes copied from the old image.
    pub copied: u64,
    /// Bytes of blocks made by patches.
    pub patched: u64,
    /// Bytes written from the delta itself.
    pub literal: u64,
    /// Regions (offset, length) that did not reproduce and were left as
    /// they were: the caller fetches them.
    #[serde(skip)]
    pub unreproduced: Vec<(u64, u64)>,
    /// Their total length.
    pub unreproduced_bytes: u64,
    /// What was copied, in output order: (new offset, old offset, length).
    #[serde(skip)]
    pub copies: Vec<(u64, u64, u64)>,
}

impl ApplyStats {
    /// A region that did not reproduce ([`apply`] sorts and merges them).
    fn missed(&mut self, at: u64, len: u64) {
        self.unreproduced_bytes += len;
        self.unreproduced.push((at, len));
    }
}

/// The block of extent sharing: XFS's and btrfs's usual block size, and the
/// alignment of `imgbuild build --align`.
const SHARE_BLOCK: u64 = 4096;

/// Copies `len` bytes at `from` in `old` to `to` in `out`, sharing extents
/// where the filesystem can; returns how many bytes the old image had.
fn copy_range(old: &File, from: u64, out: &File, to: u64, len: u64) -> io::Result<u64> {
    let mut share = |src: &mut i64, dst: &mut i64, n| nix::fcntl::copy_file_range(old, Some(src), out, Some(dst), n);
    copy_range_with(&mut share, old, from, out, to, len)
}

/// [`copy_range`] with the `copy_file_range(2)` call given, for the tests.
fn copy_range_with(
    share: &mut dyn FnMut(&mut i64, &mut i64, usize) -> nix::Result<usize>,
    old: &File,
    from: u64,
    out: &File,
    to: u64,
    len: u64,
) -> io::Result<u64> {
    let (mut src, mut dst) = (from as i64, to as i64);
    let mut left = len;
    // XFS and btrfs share extents only between ranges that start on a
    // filesystem block in both files; a call whose start is not is copied
    // whole. So when the two offsets lie alike within a block, the bytes
    // up to the next boundary go first, on their own, and the rest can be
    // shared (`--align`ed images put every unchanged file there).
    let alike = from.wrapping_sub(to) % SHARE_BLOCK == 0;
    while left > 0 {
        let head = (SHARE_BLOCK - dst as u64 % SHARE_BLOCK) % SHARE_BLOCK;
        let want = if alike && head > 0 { head.min(left) } else { left.min(1 << 30) } as usize;
        match share(&mut src, &mut dst, want) {
            Ok(0) => break,
            Ok(n) => left -= n as u64,
            Err(nix::errno::Errno::EINTR) => continue,
            // Another filesystem or an old kernel: copy through memory.
            Err(nix::errno::Errno::EXDEV | nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL) => {
                let done = len - left;
                return Ok(done + copy_through_memory(old, from + done, out, to + done, left)?);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(len - left)
}

fn copy_through_memory(old: &File, from: u64, out: &File, to: u64, len: u64) -> io::Result<u64> {
    const PIECE: u64 = 1 << 20;
    // What the old image has of the range; a bounded walk over it.
    let len = len.min(old.metadata()?.len().saturating_sub(from));
    let mut buf = vec![0u8; len.min(PIECE) as usize];
    for start in (0..len).step_by(PIECE as usize) {
        let n = (len - start).min(PIECE) as usize;
        old.read_exact_at(&mut buf[..n], from + start)?;
        out.write_all_at(&buf[..n], to + start)?;
    }
    Ok(len)
}

/// Most blocks recompressed at once. Each worker holds up to [`MAX_REFS`]
/// old blocks, the patch and the block it makes, so this bounds memory on a
/// host with many cores; recompression is the slow step (zstd 15 makes
/// about 4 MB/s on a core), so every core up to it shortens the apply.
const MAX_WORKERS: usize = 4;

/// A patch op handed to a worker: it writes its block at `at` itself.
struct PatchJob {
    at: u64,
    block: NewBlock,
    refs: Vec<OldBlock>,
    kind: PatchKind,
    patch: Vec<u8>,
}

/// What a worker did with a [`PatchJob`]: (offset, length, reproduced).
type PatchDone = io::Result<(u64, u64, bool)>;

/// A worker's zstd contexts: compression for data and fragment blocks and
/// for metadata blocks, decompression for old blocks and for patches.
struct Recompressors {
    data: BlockCompressor,
    metadata: BlockCompressor,
    unpack: BlockDecompressor,
    unpatch: Unpatcher,
}

impl Recompressors {
    fn new(c: Compressor) -> io::Result<Self> {
        Ok(Self {
            data: BlockCompressor::new(c.level)?,
            metadata: BlockCompressor::new(c.metadata_level)?,
            unpack: BlockDecompressor::new()?,
            unpatch: Unpatcher::new()?,
        })
    }

    /// What makes `block` from its patch.
    fn of(&mut self, block: &NewBlock) -> (&mut BlockCompressor, &mut Unpatcher) {
        let comp = if block.metadata { &mut self.metadata } else { &mut self.data };
        (comp, &mut self.unpatch)
    }
}

/// Makes one patched block and writes it; `false` if it did not reproduce.
fn patch_one(old: &File, out: &File, job: &PatchJob, comps: &mut Recompressors) -> io::Result<bool> {
    let mut base = Vec::new();
    let made = job
        .refs
        .iter()
        .try_for_each(|r| {
            base.extend_from_slice(&read_old_block(old, r, &mut comps.unpack)?);
            Some(())
        })
        .and_then(|()| reproduce_block(&base, job.kind, &job.patch, &job.block, comps.of(&job.block)));
    match made {
        Some(disk) => out.write_all_at(&disk, job.at).map(|()| true),
        None => Ok(false),
    }
}

/// Recompresses the jobs it receives until the channel closes. A panic in a
/// patch library becomes an error, so the ops loop never waits on a worker
/// that is gone.
fn patch_worker(
    jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<PatchJob>>,
    done: std::sync::mpsc::Sender<PatchDone>,
    old: &File,
    out: &File,
    mut comps: Recompressors,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| patch_one(old, out, &job, &mut comps)))
            .unwrap_or_else(|_| Err(io::Error::other("recompressing a patched block panicked")));
        if done.send(made.map(|ok| (job.at, job.block.size as u64, ok))).is_err() {
            return;
        }
    }
}

/// Applies `delta` to `old`, writing the new image's squashfs part at the
/// start of `out`; `progress` gets the totals once for each op (a patched
/// block's when its worker is done). Regions that do not reproduce are
/// listed, not errors; a delta that does not parse is.
///
/// Copies and literals are written by this thread in op order; patched
/// blocks are recompressed on up to [`MAX_WORKERS`] threads, each writing
/// its block where it goes, so the output does not depend on their order.
pub fn apply<R: Read>(
    delta: &mut DeltaReader<R>,
    old: &File,
    out: &File,
    progress: &dyn Fn(&ApplyStats),
) -> Result<ApplyStats, ApplyError> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS);
    let compressor = delta.header().compressor;
    let comps = (0..workers).map(|_| Recompressors::new(compressor)).collect::<io::Result<Vec<_>>>();
    let comps = comps.map_err(ApplyError::Write)?;
    let mut stats = ApplyStats::default();
    std::thread::scope(|s| {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<PatchJob>(workers);
        // Only the workers hold the receiver: were they all gone, a send
        // would fail rather than wait.
        let jobs_rx = std::sync::Arc::new(std::sync::Mutex::new(jobs_rx));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<PatchDone>();
        let workers: Vec<_> = comps
            .into_iter()
            .map(|comp| {
                let (jobs_rx, done_tx) = (jobs_rx.clone(), done_tx.clone());
                s.spawn(move || patch_worker(&jobs_rx, done_tx, old, out, comp))
            })
            .collect();
        drop((jobs_rx, done_tx));
        let answered = std::cell::Cell::new(0u64);
        let absorb = |stats: &mut ApplyStats, done: PatchDone| -> Result<(), ApplyError> {
            answered.set(answered.get() + 1);
            match done.map_err(ApplyError::Write)? {
                (_, len, true) => stats.patched += len,
                (at, len, false) => stats.missed(at, len),
            }
            progress(stats);
            Ok(())
        };
        let ops = apply_ops(delta, old, out, &jobs_tx, &mut stats, progress, &done_rx, &absorb);
        drop(jobs_tx);
        // The workers finish what they hold, whatever happened here.
        let done = done_rx.iter().try_for_each(|d| absorb(&mut stats, d));
        // Joined, not only waited for as the scope does: a thread's own
        // state (a channel's thread-local context) is freed when it exits,
        // after its closure returns, and the fuzzer's leak check saw it
        // still there. A worker that panicked was counted out above.
        for w in workers {
            let _ = w.join();
        }
        let sent = ops?;
        done?;
        if answered.get() != sent {
            let lost = io::Error::other(format!("{sent} patched blocks sent, {} made", answered.get()));
            return Err(ApplyError::Write(lost));
        }
        Ok(())
    })?;
    stats.unreproduced = in_offset_order(std::mem::take(&mut stats.unreproduced));
    Ok(stats)
}

/// Regions sorted by offset, neighbours merged: the workers report misses
/// in the order they finish.
fn in_offset_order(mut regions: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    regions.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
    for (at, len) in regions {
        match merged.last_mut() {
            Some((o, l)) if *o + *l == at => *l += len,
            _ => merged.push((at, len)),
        }
    }
    merged
}

/// The ops loop of [`apply`]: copies and literals here, patches to the
/// workers; returns how many patches it sent them.
#[allow(clippy::too_many_arguments)]
fn apply_ops<R: Read>(
    delta: &mut DeltaReader<R>,
    old: &File,
    out: &File,
    jobs: &std::sync::mpsc::SyncSender<PatchJob>,
    stats: &mut ApplyStats,
    progress: &dyn Fn(&ApplyStats),
    done: &std::sync::mpsc::Receiver<PatchDone>,
    absorb: &dyn Fn(&mut ApplyStats, PatchDone) -> Result<(), ApplyError>,
) -> Result<u64, ApplyError> {
    let (mut at, mut sent) = (0u64, 0u64);
    while let Some(op) = delta.next_op()? {
        let len = op.out_len();
        match op {
            Op::Copy { offset, len } => {
                let got = copy_range(old, offset, out, at, len).map_err(ApplyError::Write)?;
                stats.copied += got;
                if got > 0 {
                    stats.copies.push((at, offset, got));
                }
                if got < len {
                    stats.missed(at + got, len - got);
                }
                progress(stats);
            }
            Op::Literal(bytes) => {
                out.write_all_at(&bytes, at).map_err(ApplyError::Write)?;
                stats.literal += len;
                progress(stats);
            }
            Op::Patch { block, refs, kind, patch } => {
                let job = PatchJob { at, block, refs, kind, patch };
                jobs.send(job)
                    .map_err(|_| ApplyError::Write(io::Error::other("the recompressing threads are gone")))?;
                sent += 1;
            }
        }
        at += len;
        while let Ok(d) = done.try_recv() {
            absorb(stats, d)?;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_noise;

    /// Where the ops start: after magic, two digests, size, version and two levels.
    const OPS_AT: usize = 8 + 64 + 8 + 12;

    fn header(out_size: u64) -> Header {
        Header { from: Sha256Digest([1; 32]), to: Sha256Digest([2; 32]), out_size, compressor: Compressor::identity(3) }
    }

    fn encode(h: &Header, ops: &[Op]) -> Vec<u8> {
        let mut w = DeltaWriter::new(Vec::new(), h).unwrap();
        for op in ops {
            w.push(op).unwrap();
        }
        w.finish().unwrap()
    }

    fn decode(bytes: &[u8]) -> Result<(Header, Vec<Op>), DeltaFileError> {
        let mut r = DeltaReader::new(bytes)?;
        let mut ops = Vec::new();
        while let Some(op) = r.next_op()? {
            ops.push(op);
        }
        Ok((*r.header(), ops))
    }

    /// An old image of three blocks (compressed, stored, compressed) and a
    /// new one whose middle block changed in 4 KiB: (old file, old blocks,
    /// new raw blocks).
    fn images(dir: &std::path::Path) -> (File, Vec<(OldBlock, Vec<u8>)>) {
        let mut comp = BlockCompressor::new(3).unwrap();
        let text = |seed: u64| -> Vec<u8> {
            test_noise(65536, seed).iter().map(|b| b"abcdefgh \n"[(*b % 10) as usize]).collect()
        };
        let raws = [text(1), test_noise(8192, 2), text(3)];
        let mut image = Vec::new();
        let mut blocks = Vec::new();
        for raw in raws {
            let (disk, stored) = comp.pack(&raw).unwrap();
            blocks.push((
                OldBlock { offset: image.len() as u64, size: disk.len() as u32, raw_size: raw.len() as u32, stored },
                raw,
            ));
            image.extend_from_slice(&disk);
        }
        let path = dir.join("old");
        std::fs::write(&path, &image).unwrap();
        (File::open(&path).unwrap(), blocks)
    }

    fn new_block(raw: &[u8], comp: &mut BlockCompressor) -> (NewBlock, Vec<u8>) {
        let (disk, stored) = comp.pack(raw).unwrap();
        let b = NewBlock {
            size: disk.len() as u32,
            raw_size: raw.len() as u32,
            stored,
            metadata: false,
            sha256: Sha256Digest::of_bytes(&disk),
        };
        (b, disk)
    }

    #[test]
    fn ops_round_trip() {
        let ops = vec![
            Op::Copy { offset: 7, len: 100 },
            Op::Literal(b"abc".to_vec()),
            Op::Patch {
                block: NewBlock {
                    size: 10,
                    raw_size: 20,
                    stored: false,
                    metadata: true,
                    sha256: Sha256Digest([9; 32]),
                },
                refs: vec![
                    OldBlock { offset: 1, size: 5, raw_size: 5, stored: true },
                    OldBlock { offset: 9, size: 4, raw_size: 8, stored: false },
                ],
                kind: PatchKind::Zstd,
                patch: vec![1, 2, 3],
            },
            Op::Patch {
                block: NewBlock { size: 6, raw_size: 6, stored: true, metadata: false, sha256: Sha256Digest([8; 32]) },
                refs: vec![OldBlock { offset: 3, size: 5, raw_size: 5, stored: true }],
                kind: PatchKind::Bsdiff,
                patch: vec![4],
            },
        ];
        let h = header(119);
        let (h2, ops2) = decode(&encode(&h, &ops)).unwrap();
        assert_eq!((h2, ops2), (h, ops));
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would() {
        let mut w = DeltaWriter::new(Vec::new(), &header(10)).unwrap();
        assert!(w.push(&Op::Copy { offset: 0, len: 11 }).is_err(), "past the end");
        assert!(w.push(&Op::Copy { offset: 0, len: 0 }).is_err(), "empty copy");
        assert!(w.push(&Op::Literal(Vec::new())).is_err(), "empty literal");
        w.push(&Op::Literal(vec![0; 9])).unwrap();
        assert!(w.finish().is_err(), "9 of 10 bytes");
        let mut w = DeltaWriter::new(Vec::new(), &header(4 << 20)).unwrap();
        assert!(w.push(&Op::Literal(vec![0; MAX_LITERAL as usize + 1])).is_err());
        w.push(&Op::Literal(vec![0; MAX_LITERAL as usize])).unwrap();
        let patch = |size, raw_size, stored, refs: usize| Op::Patch {
            block: NewBlock { size, raw_size, stored, metadata: false, sha256: Sha256Digest([0; 32]) },
            refs: vec![OldBlock { offset: 0, size: 4, raw_size: 4, stored: true }; refs],
            kind: PatchKind::Bsdiff,
            patch: vec![],
        };
        assert!(w.push(&patch(0, 20, false, 1)).is_err(), "an empty block");
        assert!(w.push(&patch(10, MAX_BLOCK + 1, false, 1)).is_err(), "larger than squashfs allows");
        w.push(&patch(10, MAX_BLOCK, false, 1)).unwrap();
        let sized = |len: usize| Op::Patch {
            block: NewBlock { size: 10, raw_size: 20, stored: false, metadata: false, sha256: Sha256Digest([0; 32]) },
            refs: vec![OldBlock { offset: 0, size: 4, raw_size: 4, stored: true }],
            kind: PatchKind::Bsdiff,
            patch: vec![0; len],
        };
        assert!(w.push(&sized(MAX_PATCH as usize + 1)).is_err(), "a patch over the limit");
        w.push(&sized(MAX_PATCH as usize)).unwrap();
        assert!(w.push(&patch(10, 10, false, 1)).is_err(), "compressed but not smaller");
        assert!(w.push(&patch(10, 11, true, 1)).is_err(), "stored with another size");
        assert!(w.push(&patch(10, 20, false, 0)).is_err(), "no refs");
        assert!(w.push(&patch(10, 20, false, MAX_REFS + 1)).is_err(), "too many refs");
        w.push(&patch(10, 20, false, MAX_REFS)).unwrap();
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let ops = [Op::Literal(b"0123456789".to_vec())];
        let good = encode(&header(10), &ops);
        let raw = zstd::decode_all(&good[..]).unwrap();
        let recode = |raw: &[u8]| zstd::encode_all(raw, 3).unwrap();
        let err = |bytes: &[u8]| decode(bytes).unwrap_err().to_string();
        assert!(err(b"not zstd").contains("not a zstd frame"));
        assert!(err(&good[..good.len() - 3]).contains("cut short"));
        let mut m = raw.clone();
        m[0] = b'X';
        assert!(err(&recode(&m)).contains("wrong magic"));
        // The level sits after magic, two digests, size and version.
        let mut m = raw.clone();
        m[8 + 64 + 8 + 4] = 23;
        assert!(err(&recode(&m)).contains("zstd level 23"));
        let mut m = raw.clone();
        m[8 + 64 + 8 + 8] = 0;
        assert!(err(&recode(&m)).contains("metadata zstd level 0"));
        assert!(err(&recode(&raw[..raw.len() - 1])).contains("an op is cut short"));
        assert!(err(&recode(&raw[..raw.len() - 3])).contains("a literal is cut short"));
        let mut m = raw.clone();
        m.push(0);
        assert!(err(&recode(&m)).contains("bytes follow its end"));
        // Declares 11 bytes of output: the one literal ends short of it.
        let mut m = raw.clone();
        m[8 + 64] = 11;
        assert!(err(&recode(&m)).contains("ends after 10 of the 11 bytes"));
        // Declares 9: the literal runs past it.
        m[8 + 64] = 9;
        assert!(err(&recode(&m)).contains("runs past the 9-byte output"));
        let mut m = raw.clone();
        m[OPS_AT] = 9;
        assert!(err(&recode(&m)).contains("unknown op 9"));
        // A literal claiming more than the limit, and a copy that wraps.
        let mut m = raw[..OPS_AT + 1].to_vec();
        m.extend_from_slice(&(MAX_LITERAL + 1).to_le_bytes());
        assert!(err(&recode(&m)).contains("a literal of 1048577 bytes"));
        let mut m = raw[..OPS_AT].to_vec();
        m.push(OP_COPY);
        m.extend_from_slice(&u64::MAX.to_le_bytes());
        m.extend_from_slice(&2u64.to_le_bytes());
        assert!(err(&recode(&m)).contains("a copy of 2 bytes"));
    }

    /// A delta file of `out_size` bytes of output holding `ops` (raw op
    /// bytes, the end marker appended), bypassing the writer's checks.
    fn raw_file(out_size: u64, ops: &[u8]) -> Vec<u8> {
        let mut raw = MAGIC.to_vec();
        raw.extend_from_slice(&[1; 32]);
        raw.extend_from_slice(&[2; 32]);
        raw.extend_from_slice(&out_size.to_le_bytes());
        raw.extend_from_slice(&Compressor::identity(3).zstd_version.to_le_bytes());
        raw.extend_from_slice(&3u32.to_le_bytes());
        raw.extend_from_slice(&3u32.to_le_bytes());
        raw.extend_from_slice(ops);
        raw.push(OP_END);
        zstd::encode_all(&raw[..], 1).unwrap()
    }

    fn literal_op(len: usize) -> Vec<u8> {
        let mut op = vec![OP_LITERAL];
        op.extend_from_slice(&(len as u32).to_le_bytes());
        op.extend(std::iter::repeat_n(b'x', len));
        op
    }

    fn patch_op(nrefs: usize, patch_len: usize) -> Vec<u8> {
        let mut op = vec![OP_PATCH];
        op.extend_from_slice(&10u32.to_le_bytes());
        op.extend_from_slice(&20u32.to_le_bytes());
        op.extend_from_slice(&[0, 0, nrefs as u8, 0]);
        op.extend_from_slice(&[0; 32]);
        for _ in 0..nrefs {
            op.extend_from_slice(&0u64.to_le_bytes());
            op.extend_from_slice(&4u32.to_le_bytes());
            op.extend_from_slice(&4u32.to_le_bytes());
            op.push(1);
        }
        op.extend_from_slice(&(patch_len as u32).to_le_bytes());
        op.extend(std::iter::repeat_n(0u8, patch_len));
        op
    }

    #[test]
    fn the_reader_takes_every_limit_itself() {
        let max = MAX_LITERAL as usize;
        let (_, ops) = decode(&raw_file(max as u64, &literal_op(max))).unwrap();
        assert_eq!(ops[0].out_len(), max as u64, "a literal of the largest size");
        let (_, ops) = decode(&raw_file(10, &patch_op(MAX_REFS, 0))).unwrap();
        assert!(matches!(&ops[0], Op::Patch { refs, .. } if refs.len() == MAX_REFS), "the most refs");
        let (_, ops) = decode(&raw_file(10, &patch_op(1, MAX_PATCH as usize))).unwrap();
        assert!(matches!(&ops[0], Op::Patch { patch, .. } if patch.len() == MAX_PATCH as usize), "the largest patch");
        // The second op runs past what is left after the first.
        let mut two = literal_op(6);
        two.extend_from_slice(&literal_op(6));
        let e = decode(&raw_file(10, &two)).unwrap_err().to_string();
        assert!(e.contains("runs past the 10-byte output"), "{e}");
        let file = raw_file(10, &literal_op(10));
        let r = DeltaReader::new(&file[..]).unwrap();
        let shown = format!("{r:?}");
        assert!(
            shown.contains("DeltaReader") && shown.contains("out_size: 10") && shown.contains("produced: 0"),
            "{shown}"
        );
    }

    #[test]
    fn patch_fields_are_bounded() {
        let with_metadata = |metadata: u8, nrefs: u8, stored: u8, kind: u8, patch_len: u32| {
            let h = header(10);
            let mut raw = encode(&h, &[Op::Literal(vec![0; 10])]);
            raw = zstd::decode_all(&raw[..]).unwrap();
            raw.truncate(OPS_AT);
            raw.push(OP_PATCH);
            raw.extend_from_slice(&10u32.to_le_bytes());
            raw.extend_from_slice(&20u32.to_le_bytes());
            raw.extend_from_slice(&[0, metadata, nrefs, kind]);
            raw.extend_from_slice(&[0; 32]);
            for _ in 0..nrefs {
                raw.extend_from_slice(&0u64.to_le_bytes());
                raw.extend_from_slice(&4u32.to_le_bytes());
                raw.extend_from_slice(&4u32.to_le_bytes());
                raw.push(stored);
            }
            raw.extend_from_slice(&patch_len.to_le_bytes());
            decode(&zstd::encode_all(&raw[..], 3).unwrap()).unwrap_err().to_string()
        };
        let base = |nrefs: u8, stored: u8, kind: u8, patch_len: u32| with_metadata(0, nrefs, stored, kind, patch_len);
        assert!(base(0, 1, 0, 0).contains("reads 0 old blocks"));
        assert!(base(5, 1, 0, 0).contains("reads 5 old blocks"));
        assert!(base(1, 1, 2, 0).contains("unknown patch kind 2"));
        assert!(base(1, 2, 1, 0).contains("stored flag 2"));
        assert!(with_metadata(2, 1, 1, 1, 0).contains("metadata flag 2"));
        assert!(base(1, 0, 1, 0).contains("an old block of 4 bytes"));
        assert!(base(1, 1, 1, MAX_PATCH + 1).contains("a patch of 4194305 bytes"));
        assert!(base(1, 1, 0, 3).contains("a patch is cut short"));
    }

    #[test]
    fn apply_copies_patches_and_writes_literals() {
        let dir = tempfile::tempdir().unwrap();
        let (old, blocks) = images(dir.path());
        let mut comp = BlockCompressor::new(3).unwrap();
        // Block 0 unchanged; block 2 with 4 KiB overwritten at a third.
        let mut raw2 = blocks[2].1.clone();
        raw2[20000..24096].copy_from_slice(&test_noise(4096, 7));
        let (b2, disk2) = new_block(&raw2, &mut comp);
        let patch = make_patch(PatchKind::Zstd, &blocks[2].1, &raw2);
        let packed = zstd::encode_all(&patch[..], 3).unwrap().len();
        assert!(packed < 6000 && packed * 3 < b2.size as usize, "a 4 KiB edit's patch packs to {packed} bytes");
        let ops = vec![
            Op::Literal(b"head".to_vec()),
            Op::Copy { offset: blocks[0].0.offset, len: blocks[0].0.size as u64 },
            Op::Patch { block: b2, refs: vec![blocks[2].0], kind: PatchKind::Zstd, patch },
        ];
        let mut expected = b"head".to_vec();
        let mut buf = vec![0; blocks[0].0.size as usize];
        old.read_exact_at(&mut buf, 0).unwrap();
        expected.extend_from_slice(&buf);
        expected.extend_from_slice(&disk2);
        let delta = encode(&header(expected.len() as u64), &ops);
        let out = tempfile::tempfile().unwrap();
        let seen = std::cell::Cell::new((0, 0));
        let progress = |s: &ApplyStats| seen.set((seen.get().0 + 1, s.copied + s.patched + s.literal));
        let stats = apply(&mut DeltaReader::new(&delta[..]).unwrap(), &old, &out, &progress).unwrap();
        let mut got = Vec::new();
        (&out).read_to_end(&mut got).unwrap();
        assert!(got == expected, "the output differs");
        assert_eq!(seen.get(), (3, expected.len() as u64), "after each of the 3 ops, the totals");
        assert_eq!(
            stats,
            ApplyStats {
                copied: blocks[0].0.size as u64,
                patched: disk2.len() as u64,
                literal: 4,
                unreproduced: vec![],
                unreproduced_bytes: 0,
                copies: vec![(4, 0, blocks[0].0.size as u64)],
            }
        );
    }

    #[test]
    fn missed_regions_come_out_sorted_and_merged() {
        assert_eq!(in_offset_order(vec![(30, 5), (10, 10), (40, 1), (20, 10), (35, 2)]), vec![(10, 27), (40, 1)]);
        assert_eq!(in_offset_order(vec![]), vec![]);
    }

    #[test]
    fn many_patches_land_in_place_whatever_order_the_workers_finish_in() {
        let dir = tempfile::tempdir().unwrap();
        let (old, blocks) = images(dir.path());
        let mut comp = BlockCompressor::new(3).unwrap();
        // 40 patched blocks, more than the workers and their queue hold;
        // every 5th (and the one after it) made at another level, so it
        // does not reproduce: pairs of neighbours that must merge into one
        // region each, in offset order.
        let mut ops = vec![Op::Literal(b"head".to_vec())];
        let mut expected = b"head".to_vec();
        let mut missed = Vec::new();
        let mut other = BlockCompressor::new(9).unwrap();
        for i in 0..40u64 {
            let mut raw = blocks[0].1.clone();
            raw[(i as usize) * 100..(i as usize) * 100 + 64].copy_from_slice(&test_noise(64, 100 + i));
            let bad = i % 5 == 0 || i % 5 == 1;
            let (b, disk) = new_block(&raw, if bad { &mut other } else { &mut comp });
            if bad {
                match missed.last_mut() {
                    Some((o, l)) if *o + *l == expected.len() as u64 => *l += disk.len() as u64,
                    _ => missed.push((expected.len() as u64, disk.len() as u64)),
                }
                expected.extend(std::iter::repeat_n(0u8, disk.len()));
            } else {
                expected.extend_from_slice(&disk);
            }
            let patch = make_patch(PatchKind::Zstd, &blocks[0].1, &raw);
            ops.push(Op::Patch { block: b, refs: vec![blocks[0].0], kind: PatchKind::Zstd, patch });
        }
        ops.push(Op::Literal(b"tail".to_vec()));
        expected.extend_from_slice(b"tail");
        let delta = encode(&header(expected.len() as u64), &ops);
        let out = tempfile::tempfile().unwrap();
        let calls = std::cell::Cell::new(0);
        let stats = apply(&mut DeltaReader::new(&delta[..]).unwrap(), &old, &out, &|_| calls.set(calls.get() + 1));
        let stats = stats.unwrap();
        let mut got = Vec::new();
        (&out).read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the output differs");
        assert_eq!(calls.get(), 42, "one progress call for each op");
        assert_eq!(missed.len(), 8);
        assert_eq!(stats.unreproduced, missed);
        assert_eq!(stats.unreproduced_bytes, missed.iter().map(|m| m.1).sum::<u64>());
        assert_eq!(stats.patched + stats.unreproduced_bytes + 8, expected.len() as u64);
        // An image that cannot be written is an error, not a miss.
        let read_only = File::open(dir.path().join("old")).unwrap();
        let err = apply(&mut DeltaReader::new(&delta[..]).unwrap(), &old, &read_only, &|_| ()).unwrap_err();
        assert!(matches!(err, ApplyError::Write(_)), "{err:?}");
        let only_patches = encode(&header(expected.len() as u64 - 8), &ops[1..41]);
        let err = apply(&mut DeltaReader::new(&only_patches[..]).unwrap(), &old, &read_only, &|_| ()).unwrap_err();
        assert!(matches!(err, ApplyError::Write(_)), "a worker's write error: {err:?}");
    }

    #[test]
    fn metadata_blocks_are_recompressed_at_the_metadata_level() {
        let dir = tempfile::tempdir().unwrap();
        let (old, blocks) = images(dir.path());
        let mut raw = blocks[0].1.clone();
        raw[100] ^= 1;
        // Compressed at level 3: what the header names as the metadata level.
        let (b, disk) = new_block(&raw, &mut BlockCompressor::new(3).unwrap());
        let patch = make_patch(PatchKind::Zstd, &blocks[0].1, &raw);
        let run = |metadata: bool, level: u32, metadata_level: u32| {
            let mut h = header(b.size as u64);
            h.compressor = Compressor { level, metadata_level, ..h.compressor };
            let block = NewBlock { metadata, ..b };
            let ops = [Op::Patch { block, refs: vec![blocks[0].0], kind: PatchKind::Zstd, patch: patch.clone() }];
            let out = tempfile::tempfile().unwrap();
            out.set_len(b.size as u64).unwrap();
            let stats = apply(&mut DeltaReader::new(&encode(&h, &ops)[..]).unwrap(), &old, &out, &|_| ()).unwrap();
            let mut got = vec![0u8; disk.len()];
            out.read_exact_at(&mut got, 0).unwrap();
            (stats.patched, stats.unreproduced_bytes, got == disk)
        };
        let size = b.size as u64;
        assert_eq!(run(true, 19, 3), (size, 0, true), "a metadata block at the metadata level");
        assert_eq!(run(false, 19, 3), (0, size, false), "the same block taken for data: level 19");
        assert_eq!(run(false, 3, 19), (size, 0, true), "a data block at the data level");
        assert_eq!(run(true, 3, 19), (0, size, false), "the same block taken for metadata: level 19");
    }

    #[test]
    fn a_block_that_does_not_reproduce_is_left_for_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let (old, blocks) = images(dir.path());
        let mut comp = BlockCompressor::new(3).unwrap();
        let mut raw = blocks[0].1.clone();
        raw[100] ^= 1;
        let (b, _) = new_block(&raw, &mut comp);
        let patch = make_patch(PatchKind::Bsdiff, &blocks[0].1, &raw);
        // Another compressor level: the recompressed bytes differ, and the region is reported.
        let mut h = header(4 + b.size as u64 + 15);
        h.compressor.level = 19;
        let ops = vec![
            Op::Literal(b"head".to_vec()),
            Op::Patch { block: b, refs: vec![blocks[0].0], kind: PatchKind::Bsdiff, patch: patch.clone() },
            // A copy past the end of the old image: only what it has is copied.
            Op::Copy { offset: std::fs::metadata(dir.path().join("old")).unwrap().len() - 4, len: 10 },
            // Wholly past it, right after: one region with the copy's missing end.
            Op::Copy { offset: 1 << 40, len: 5 },
        ];
        let out = tempfile::tempfile().unwrap();
        let stats = apply(&mut DeltaReader::new(&encode(&h, &ops)[..]).unwrap(), &old, &out, &|_| ()).unwrap();
        let size = b.size as u64;
        assert_eq!(stats.unreproduced, vec![(4, size), (4 + size + 4, 11)]);
        assert_eq!((stats.unreproduced_bytes, stats.copied, stats.patched), (size + 11, 4, 0));
        // Only what was copied is listed as copied.
        let old_len = std::fs::metadata(dir.path().join("old")).unwrap().len();
        assert_eq!(stats.copies, vec![(4 + size, old_len - 4, 4)]);
        // At the right level it reproduces; from a damaged old block it does not.
        let (mut comp, mut up) = (BlockCompressor::new(3).unwrap(), Unpatcher::new().unwrap());
        assert!(reproduce_block(&blocks[0].1, PatchKind::Bsdiff, &patch, &b, (&mut comp, &mut up)).is_some());
        let mut damaged = blocks[0].1.clone();
        damaged[5] ^= 0xff;
        assert!(reproduce_block(&damaged, PatchKind::Bsdiff, &patch, &b, (&mut comp, &mut up)).is_none());
        let cut = &patch[..patch.len() - 1];
        assert!(reproduce_block(&blocks[0].1, PatchKind::Bsdiff, cut, &b, (&mut comp, &mut up)).is_none(), "cut patch");
        assert!(
            reproduce_block(&blocks[0].1, PatchKind::Zstd, &patch, &b, (&mut comp, &mut up)).is_none(),
            "another kind"
        );
        // An old block that does not decompress, or lies past the end, is no
        // base; the context reads the next one all the same.
        let mut d = BlockDecompressor::new().unwrap();
        let mut wrong = blocks[0].0;
        wrong.offset += 1;
        assert!(read_old_block(&old, &wrong, &mut d).is_none());
        wrong.offset = 1 << 40;
        assert_eq!(read_old_block(&old, &blocks[1].0, &mut d).as_ref(), Some(&blocks[1].1));
        assert!(read_old_block(&old, &wrong, &mut d).is_none());
    }

    #[test]
    fn stored_blocks_reproduce_without_the_compressor() {
        let mut comp = BlockCompressor::new(3).unwrap();
        let old = test_noise(4096, 5);
        let mut new = old.clone();
        new[0] ^= 1;
        let (b, disk) = new_block(&new, &mut comp);
        assert!(b.stored);
        let mut up = Unpatcher::new().unwrap();
        for kind in [PatchKind::Bsdiff, PatchKind::Zstd] {
            let patch = make_patch(kind, &old, &new);
            let got = reproduce_block(&old, kind, &patch, &b, (&mut comp, &mut up));
            assert_eq!(got, Some(disk.clone()), "{kind:?}");
            let mut other = b;
            other.raw_size += 1;
            let got = reproduce_block(&old, kind, &patch, &other, (&mut comp, &mut up));
            assert!(got.is_none(), "{kind:?}: too long");
            other.raw_size -= 2;
            let got = reproduce_block(&old, kind, &patch, &other, (&mut comp, &mut up));
            assert!(got.is_none(), "{kind:?}: too short");
            // A patch that makes more bytes than the block has is refused
            // before anything is hashed, whatever it makes after them.
            let n = new.len() as u32;
            assert_eq!(up.unpatch(&old, kind, &patch, n).as_deref(), Some(&new[..]), "{kind:?}");
            assert_eq!(up.unpatch(&old, kind, &patch, n - 1), None, "{kind:?}: a byte too many");
            assert_eq!(up.unpatch(&old, kind, &patch, n + 1), None, "{kind:?}: a byte short");
        }
    }

    #[test]
    fn a_base_that_starts_like_a_zstd_dictionary_is_still_raw_bytes() {
        // The patch's writer takes its base as raw bytes whatever they are;
        // zstd's one-call decoder would read this one as a dictionary.
        let mut old = ZSTD_DICT_MAGIC.to_vec();
        old.extend((0..20000u32).map(|i| (i % 97) as u8 ^ (i / 300) as u8));
        let mut new = old.clone();
        new[9000..9100].copy_from_slice(&test_noise(100, 3));
        let patch = make_patch(PatchKind::Zstd, &old, &new);
        let mut up = Unpatcher::new().unwrap();
        let n = new.len() as u32;
        assert_eq!(up.unpatch(&old, PatchKind::Zstd, &patch, n).as_deref(), Some(&new[..]));
        assert_eq!(up.unpatch(&old, PatchKind::Zstd, &patch, n - 1), None, "a byte too many");
        assert_eq!(up.unpatch(&old, PatchKind::Zstd, &patch, n + 1), None, "a byte short");
        // The same context goes on with ordinary bases.
        let (old, new) = (&old[4..], &new[4..]);
        let patch = make_patch(PatchKind::Zstd, old, new);
        assert_eq!(up.unpatch(old, PatchKind::Zstd, &patch, n - 4).as_deref(), Some(new));
    }

    #[test]
    fn a_zstd_patch_is_decoded_into_the_block_whatever_window_it_asks_for() {
        // A frame that asks for a 128 MiB window, which a stream decoder
        // would have to hold (and is refused past WINDOW_LOG_MAX): decoded
        // in one call, the output is the window, a block's size at most.
        let old: Vec<u8> = (0..20000u32).map(|i| (i % 89) as u8).collect();
        let mut new = old.clone();
        new[100..200].copy_from_slice(&test_noise(100, 4));
        let mut patch = Vec::new();
        let mut e = zstd::stream::write::Encoder::with_ref_prefix(&mut patch, ZSTD_PATCH_LEVEL, &old).unwrap();
        e.window_log(27).unwrap();
        e.write_all(&new).unwrap();
        e.finish().unwrap();
        let mut stream = zstd::stream::read::Decoder::with_ref_prefix(&patch[..], &old).unwrap();
        stream.window_log_max(WINDOW_LOG_MAX).unwrap();
        assert!(stream.read_to_end(&mut Vec::new()).is_err(), "the stream decoder takes it");
        let got = Unpatcher::new().unwrap().unpatch(&old, PatchKind::Zstd, &patch, new.len() as u32);
        assert_eq!(got.as_deref(), Some(&new[..]));
    }

    /// Where `copy_file_range` is refused (another filesystem, an old
    /// kernel, a file it cannot take), the rest goes through memory; an
    /// interrupted call is retried; any other error is the caller's.
    #[test]
    fn copies_fall_back_to_memory_where_sharing_is_refused() {
        use nix::errno::Errno;
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("o");
        let data = test_noise(1 << 20, 13);
        std::fs::write(&old_path, &data).unwrap();
        let old = File::open(&old_path).unwrap();
        for refusal in [Errno::EXDEV, Errno::ENOSYS, Errno::EINVAL] {
            let out = tempfile::tempfile_in(dir.path()).unwrap();
            let mut calls = 0;
            // Interrupted once, then 1000 bytes shared, then refused.
            let mut share = |src: &mut i64, dst: &mut i64, n: usize| {
                calls += 1;
                match calls {
                    1 => Err(Errno::EINTR),
                    2 => {
                        let n = n.min(1000);
                        let got = nix::fcntl::copy_file_range(&old, Some(src), &out, Some(dst), n)?;
                        assert_eq!(got, n);
                        Ok(got)
                    }
                    _ => Err(refusal),
                }
            };
            let copied = copy_range_with(&mut share, &old, 5, &out, 2, 600_000).unwrap();
            assert_eq!(copied, 600_000, "{refusal}");
            let mut got = vec![0u8; 600_000];
            out.read_exact_at(&mut got, 2).unwrap();
            assert!(got[..] == data[5..600_005], "{refusal}: the copied bytes differ");
            assert_eq!(out.metadata().unwrap().len(), 600_002, "{refusal}");
            // Past the old end: what is there.
            let mut refused = |_: &mut i64, _: &mut i64, _: usize| Err(refusal);
            assert_eq!(copy_range_with(&mut refused, &old, (1 << 20) - 3, &out, 0, 10).unwrap(), 3);
        }
        let out = tempfile::tempfile_in(dir.path()).unwrap();
        let mut failing = |_: &mut i64, _: &mut i64, _: usize| Err(Errno::EIO);
        let e = copy_range_with(&mut failing, &old, 0, &out, 0, 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::EIO as i32));
    }

    /// A range whose offsets lie alike within a 4 KiB block is asked for in
    /// two calls, the bytes up to the boundary first, so the rest starts
    /// aligned in both files and can be shared; offsets that lie apart, or
    /// an aligned start, make one call.
    #[test]
    fn copies_split_at_the_first_boundary_when_offsets_lie_alike() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("o");
        let data = test_noise(1 << 20, 17);
        std::fs::write(&old_path, &data).unwrap();
        let old = File::open(&old_path).unwrap();
        for (from, to, len, calls) in [
            (5_000u64, 9_096u64, 300_000u64, vec![3_192usize, 296_808]),
            (904, 904, 3_000, vec![3_000]),
            (8_192, 4_096, 300_000, vec![300_000]),
            (5_000, 9_097, 300_000, vec![300_000]),
            (0, 4_095, 10, vec![10]),
        ] {
            let out = tempfile::tempfile_in(dir.path()).unwrap();
            let mut asked = Vec::new();
            let mut share = |src: &mut i64, dst: &mut i64, n: usize| {
                asked.push(n);
                nix::fcntl::copy_file_range(&old, Some(src), &out, Some(dst), n)
            };
            assert_eq!(copy_range_with(&mut share, &old, from, &out, to, len).unwrap(), len);
            assert_eq!(asked, calls, "{from} -> {to}");
            let mut got = vec![0u8; len as usize];
            out.read_exact_at(&mut got, to).unwrap();
            assert!(got[..] == data[from as usize..(from + len) as usize], "{from} -> {to}: bytes differ");
        }
    }

    #[test]
    fn copies_share_or_copy_and_stop_at_the_old_end() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("o");
        let data = test_noise(3 << 20, 9);
        std::fs::write(&old_path, &data).unwrap();
        let old = File::open(&old_path).unwrap();
        let out = tempfile::tempfile_in(dir.path()).unwrap();
        assert_eq!(copy_range(&old, 5, &out, 1, (3 << 20) - 5).unwrap(), (3 << 20) - 5);
        assert_eq!(copy_range(&old, (3 << 20) - 2, &out, 0, 1).unwrap(), 1);
        assert_eq!(copy_range(&old, (3 << 20) - 2, &out, 0, 10).unwrap(), 2);
        let mut got = vec![0u8; 3 << 20];
        out.read_exact_at(&mut got[..(3 << 20) - 4], 0).unwrap();
        assert!(got[2..(3 << 20) - 4] == data[6..3 << 20], "copied bytes differ");
        assert_eq!(&got[..2], &data[(3 << 20) - 2..]);
        let out2 = tempfile::tempfile_in(dir.path()).unwrap();
        assert_eq!(copy_through_memory(&old, 1, &out2, 0, (2 << 20) + 3).unwrap(), (2 << 20) + 3);
        let mut got = vec![0u8; (2 << 20) + 3];
        out2.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..] == data[1..(2 << 20) + 4], "copied bytes differ");
        assert_eq!(copy_through_memory(&old, (3 << 20) - 1, &out2, 0, 5).unwrap(), 1);
    }
}
