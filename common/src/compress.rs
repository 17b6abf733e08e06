//! The one zstd block compressor of the project.
//!
//! `imgbuild` hands this compressor to libsquashfs for every block of an
//! image (data, fragment and metadata), and a deployer that rebuilds an image
//! from blocks it already has (static deltas) recompresses with the same
//! function. Both must produce the very bytes the other would, so everything
//! that decides the output is fixed here: the zstd library is the one the
//! `zstd` crate bundles (its version is pinned by `Cargo.lock` and recorded
//! in every block map as [`Compressor::identity`]), the level is the only
//! parameter, and the output buffer is always `ZSTD_compressBound` long, so
//! zstd never takes a different path for a tight buffer.
//!
//! A block whose compressed form is not smaller than itself is stored
//! uncompressed, as squashfs requires and libsquashfs does.
//!
//! Metadata blocks (inodes, directories, the tables) are compressed at
//! [`METADATA_LEVEL`] whatever the data's level. Every build writes its
//! metadata anew, and a change anywhere moves `blocks_start` in many
//! inodes, so a static delta asks each host to recompress hundreds of small
//! metadata blocks: at level 15 that took 0.3 s of CPU for a one-line edit,
//! more than the rest of the delta. Metadata is about 1% of an image, and
//! level 3 makes it a few percent larger.

use std::io;

/// What compressing a block gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packed {
    /// The first `n` bytes of the output buffer are the compressed block.
    Compressed(usize),
    /// Compression does not shrink the block: store it as it is.
    Stored,
}

/// zstd level of metadata blocks (or the data's level, if lower).
pub const METADATA_LEVEL: u32 = 3;

/// The compressor identity recorded in block maps and static deltas: bytes
/// compressed by one identity are reproduced only by the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Compressor {
    /// The bundled libzstd's `ZSTD_versionNumber()`.
    pub zstd_version: u32,
    /// zstd level of data and fragment blocks, 1..=22.
    pub level: u32,
    /// zstd level of metadata blocks, 1..=22.
    pub metadata_level: u32,
}

impl Compressor {
    /// This build's compressor at `level` (metadata at [`METADATA_LEVEL`],
    /// or `level` if lower).
    pub fn identity(level: u32) -> Self {
        Self { zstd_version: zstd::zstd_safe::version_number(), level, metadata_level: level.min(METADATA_LEVEL) }
    }

    /// The level of a metadata block, or of a data or fragment block.
    pub fn level_of(&self, metadata: bool) -> u32 {
        if metadata {
            self.metadata_level
        } else {
            self.level
        }
    }

    /// Why these levels cannot be this identity's, if they cannot.
    pub fn check_levels(&self) -> Result<(), String> {
        for (what, l) in [("zstd level", self.level), ("metadata zstd level", self.metadata_level)] {
            if !(1..=22).contains(&l) {
                return Err(format!("{what} {l} is out of range"));
            }
        }
        Ok(())
    }
}

/// A compression context (one per thread).
pub struct BlockCompressor {
    cctx: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for BlockCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCompressor").finish_non_exhaustive()
    }
}

impl BlockCompressor {
    /// A context compressing at `level` (1..=22).
    pub fn new(level: u32) -> io::Result<Self> {
        let level = i32::try_from(level).map_err(|_| io::Error::other("zstd level out of range"))?;
        Ok(Self { cctx: zstd::bulk::Compressor::new(level)?, scratch: Vec::new() })
    }

    /// Compresses `input` into `out` (which must hold `input.len() - 1`
    /// bytes: anything longer is stored instead).
    pub fn compress(&mut self, input: &[u8], out: &mut [u8]) -> io::Result<Packed> {
        let bound = zstd::zstd_safe::compress_bound(input.len());
        self.scratch.resize(bound, 0);
        let n = self.cctx.compress_to_buffer(input, &mut self.scratch)?;
        if n >= input.len() {
            return Ok(Packed::Stored);
        }
        let have = out.len();
        let dst =
            out.get_mut(..n).ok_or_else(|| io::Error::other(format!("output buffer of {have} bytes is too small")))?;
        dst.copy_from_slice(&self.scratch[..n]);
        Ok(Packed::Compressed(n))
    }

    /// The on-disk form of `input`: compressed bytes, or `input` itself when stored.
    pub fn pack(&mut self, input: &[u8]) -> io::Result<(Vec<u8>, bool)> {
        let mut out = vec![0u8; input.len()];
        match self.compress(input, &mut out)? {
            Packed::Compressed(n) => {
                out.truncate(n);
                Ok((out, false))
            }
            Packed::Stored => Ok((input.to_vec(), true)),
        }
    }
}

/// Decompresses a published zstd file (chunk index, block map), which is
/// untrusted until its signed sha256 was checked (and fuzzed regardless):
/// anything that is not a zstd frame is refused before a decoder exists,
/// the window is bounded (a frame header may ask for 2 GiB; level 19 uses
/// at most 8 MiB), and the output grows with what was really decoded, up to
/// `limit` bytes. The error is a reason, for the caller's own error type.
pub fn decode_bounded(compressed: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    /// 32 MiB.
    const WINDOW_LOG_MAX: u32 = 25;
    if !compressed.starts_with(&ZSTD_MAGIC) {
        return Err("not a zstd frame".into());
    }
    let err = |e: io::Error| e.to_string();
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(err)?;
    decoder.window_log_max(WINDOW_LOG_MAX).map_err(err)?;
    let mut raw = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(decoder, limit as u64 + 1), &mut raw).map_err(err)?;
    if raw.len() > limit {
        return Err(format!("it expands beyond the {limit}-byte limit"));
    }
    Ok(raw)
}

/// Decompresses one block that must expand to exactly `raw_len` bytes
/// (bounded: a block claiming more is an error, never an allocation).
pub fn decompress_block(block: &[u8], raw_len: usize) -> io::Result<Vec<u8>> {
    BlockDecompressor::new()?.unpack(block, raw_len)
}

/// A decompression context kept for many blocks (one per thread): making a
/// fresh one for each block of a static delta was a few percent of its CPU.
pub struct BlockDecompressor(zstd::bulk::Decompressor<'static>);

impl BlockDecompressor {
    /// A fresh context.
    pub fn new() -> io::Result<Self> {
        Ok(Self(zstd::bulk::Decompressor::new()?))
    }

    /// [`decompress_block`] with this context.
    pub fn unpack(&mut self, block: &[u8], raw_len: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(raw_len);
        let n = self.0.decompress_to_buffer(block, &mut out)?;
        if n != raw_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("block expands to {n} bytes, {raw_len} expected"),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_noise as noise;

    #[test]
    fn compressible_blocks_shrink_and_round_trip() {
        let input: Vec<u8> = (0..131072u32).map(|i| (i % 251) as u8 / 4).collect();
        let mut c = BlockCompressor::new(15).unwrap();
        let (packed, stored) = c.pack(&input).unwrap();
        assert!(!stored && packed.len() < input.len() / 4);
        assert_eq!(decompress_block(&packed, input.len()).unwrap(), input);
        assert!(decompress_block(&packed, input.len() - 1).is_err());
        assert!(decompress_block(&packed, input.len() + 1).is_err());
        // One context serves block after block, a refused one included.
        let mut d = BlockDecompressor::new().unwrap();
        assert!(d.unpack(&packed, input.len() - 1).is_err());
        assert_eq!(d.unpack(&packed, input.len()).unwrap(), input);
        assert_eq!(d.unpack(&c.pack(&input[..4096]).unwrap().0, 4096).unwrap(), input[..4096]);
        // The same input gives the same bytes from another context, every time.
        let mut other = BlockCompressor::new(15).unwrap();
        other.pack(&[1, 2, 3]).unwrap();
        assert_eq!(other.pack(&input).unwrap(), (packed.clone(), false));
        // Another level gives other bytes.
        assert_ne!(BlockCompressor::new(3).unwrap().pack(&input).unwrap().0, packed);
    }

    #[test]
    fn incompressible_blocks_are_stored() {
        let input = noise(8192, 0x9e3779b97f4a7c15);
        let mut c = BlockCompressor::new(19).unwrap();
        assert_eq!(c.pack(&input).unwrap(), (input.clone(), true));
        let mut small = [0u8; 4];
        assert_eq!(c.compress(&input, &mut small).unwrap(), Packed::Stored);
        // A compressible block that does not fit the caller's buffer is an error, not a truncation.
        assert!(c.compress(&[0u8; 8192], &mut small).is_err());
        assert_eq!(Compressor::identity(19).level, 19);
        assert_eq!(Compressor::identity(19).metadata_level, METADATA_LEVEL);
        assert_eq!(Compressor::identity(1).metadata_level, 1);
        let c19 = Compressor::identity(19);
        assert_eq!((c19.level_of(false), c19.level_of(true)), (19, METADATA_LEVEL));
        assert!(Compressor::identity(19).zstd_version >= 10507);
        assert!(format!("{c:?}").starts_with("BlockCompressor"));
    }

    #[test]
    fn levels_outside_1_to_22_are_refused() {
        let ok = Compressor::identity(15);
        for (level, metadata_level) in [(15, 3), (1, 22), (22, 1)] {
            assert_eq!(Compressor { level, metadata_level, ..ok }.check_levels(), Ok(()));
        }
        for (level, metadata_level, what) in [
            (0, 3, "zstd level 0"),
            (23, 3, "level 23"),
            (15, 0, "metadata zstd level 0"),
            (15, 23, "metadata zstd level 23"),
        ] {
            let e = Compressor { level, metadata_level, ..ok }.check_levels().unwrap_err();
            assert!(e.contains(what) && e.ends_with("out of range"), "{e}");
        }
    }

    #[test]
    fn a_block_that_compresses_to_its_own_length_is_stored() {
        // Found by search: 600 noise bytes and 20 more compress, at level 15,
        // to exactly 620 bytes, which squashfs must store uncompressed.
        let mut input = noise(600, 0x1234567);
        input.extend_from_slice(&[b'a'; 20]);
        assert_eq!(zstd::bulk::compress(&input, 15).unwrap().len(), input.len());
        assert_eq!(BlockCompressor::new(15).unwrap().pack(&input).unwrap(), (input.clone(), true));
    }
}
