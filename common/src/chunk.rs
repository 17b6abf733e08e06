//! The chunk index: the image cut into content-defined chunks (FastCDC 2020),
//! each with its length and a 128-bit hash (SHA-256 truncated to 16 bytes). A deployer that already holds an older
//! image finds which chunks of the new one it has locally and fetches only
//! the rest with HTTP Range requests on the one published image file.
//!
//! Binary format (little endian), published zstd-compressed and
//! content-addressed as `indexes/<sha256>.idx`, its sha256 and size signed in
//! the manifest:
//!
//! ```text
//! magic "IMGIDX\x01\0" | min u32 | avg u32 | max u32 | image_size u64 | count u64
//! count x ( length u32 | hash [u8; 16] )            offsets are cumulative
//! ```
//!
//! Why 16 bytes: the chunk hash decides which local bytes to reuse and checks
//! each chunk from the server, but integrity rests on the full SHA-256 of the
//! whole image, signed in the manifest and computed over exactly the bytes
//! written; truncating halves the index (the largest part of a small delta).
//! Why 8/32/128 KiB chunks: measured on a 1.3 GB tree (BENCHMARKS.md), they
//! fetch the fewest bytes for small changes, index included.
//!
//! Parsing checks every bound (chunk sizes within the declared limits, the
//! lengths summing to the image size) before anything is allocated from the
//! input's numbers.

use std::io::{self, Read};

use crate::digest::{Checkpoint, ResumableSha256, Sha256Digest};

const MAGIC: &[u8; 8] = b"IMGIDX\x01\0";
const HEADER: usize = 8 + 4 * 3 + 8 + 8;
const HASH: usize = 16;
const ENTRY: usize = 4 + HASH;
/// Largest decompressed index accepted (about 1.8 million chunks, a 120 GB image).
pub const MAX_INDEX_BYTES: usize = 64 << 20;

/// Chunk size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChunkParams {
    /// Smallest chunk (except the last).
    pub min: u32,
    /// Average chunk.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for ChunkParams {
    /// 8 / 32 / 128 KiB (see the module docs).
    fn default() -> Self {
        ChunkParams { min: 8 << 10, avg: 32 << 10, max: 128 << 10 }
    }
}

/// A chunk's hash: the first 16 bytes of its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; HASH]);

impl ChunkHash {
    /// Hashes a chunk's bytes.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkHash(Sha256Digest::of_bytes(bytes).0[..HASH].try_into().expect("16 bytes"))
    }
}

/// One chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Hash of the chunk's bytes.
    pub hash: ChunkHash,
}

/// Why an index was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// Not our format.
    #[error("chunk index has a bad magic number or version")]
    Magic,
    /// Cut short or with trailing bytes.
    #[error("chunk index is {found} bytes, its header promises {expected}")]
    Length {
        /// Expected length.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// Inconsistent numbers.
    #[error("chunk index is inconsistent: {0}")]
    Invalid(String),
    /// zstd failed or the result is too large.
    #[error("chunk index does not decompress: {0}")]
    Compression(String),
}

/// An image's chunk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    /// The limits it was cut with.
    pub params: ChunkParams,
    /// Size of the image.
    pub image_size: u64,
    /// The chunks, in order, tiling the image.
    pub chunks: Vec<Chunk>,
}

impl ChunkIndex {
    /// Reads `reader` once: returns its index, its whole sha256 and its size.
    /// Cutting runs on this thread; hashing (each chunk and the whole) on a
    /// second one, so the pass costs about as much as the slower of the two.
    pub fn build(reader: impl Read, params: ChunkParams) -> io::Result<(ChunkIndex, Sha256Digest, u64)> {
        Self::build_with_checkpoints(reader, params, &[]).map(|(index, sha, size, _)| (index, sha, size))
    }

    /// [`ChunkIndex::build`], also recording the whole image's SHA-256
    /// state at each offset of `at` the image reaches (in increasing order,
    /// multiples of 64; [`crate::digest::Checkpoint`]).
    pub fn build_with_checkpoints(
        reader: impl Read,
        params: ChunkParams,
        at: &[u64],
    ) -> io::Result<(ChunkIndex, Sha256Digest, u64, Vec<Checkpoint>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(32);
        let at = at.to_vec();
        let hasher = std::thread::spawn(move || {
            let mut whole = ResumableSha256::new();
            let mut checkpoints = Vec::new();
            let mut next = at.iter().copied().peekable();
            let mut chunks = Vec::new();
            for (offset, data) in rx {
                chunks.push(Chunk { offset, len: data.len() as u32, hash: ChunkHash::of(&data) });
                let mut rest = &data[..];
                // Cut the chunk at each checkpoint inside it (or at its end).
                while let Some(&cut) = next.peek() {
                    if cut > whole.count() + rest.len() as u64 {
                        break;
                    }
                    // An offset already passed or recorded is left out.
                    let fresh = checkpoints.last().is_none_or(|c: &Checkpoint| c.at != cut);
                    if let Some(before) = cut.checked_sub(whole.count()).filter(|_| fresh) {
                        let (before, after) = rest.split_at(before as usize);
                        whole.update(before);
                        checkpoints.extend(whole.checkpoint());
                        rest = after;
                    }
                    next.next();
                }
                whole.update(rest);
            }
            (chunks, whole.finish(), checkpoints)
        });
        let cdc = fastcdc::v2020::StreamCDC::new(reader, params.min as usize, params.avg as usize, params.max as usize);
        let mut result = Ok(());
        for c in cdc {
            match c {
                // The hasher only stops when the sender is dropped below.
                Ok(c) => {
                    let _ = tx.send((c.offset, c.data));
                }
                Err(e) => {
                    result = Err(match e {
                        fastcdc::v2020::Error::IoError(e) => e,
                        other => io::Error::other(other.to_string()),
                    });
                    break;
                }
            }
        }
        drop(tx);
        let (chunks, (sha, size), checkpoints) = hasher.join().expect("the hashing thread does not panic");
        result?;
        Ok((ChunkIndex { params, image_size: size, chunks }, sha, size, checkpoints))
    }

    /// The uncompressed binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.chunks.len());
        out.extend_from_slice(MAGIC);
        for v in [self.params.min, self.params.avg, self.params.max] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.hash.0);
        }
        out
    }

    /// Parses the uncompressed binary form.
    pub fn parse(b: &[u8]) -> Result<Self, IndexError> {
        if b.len() < HEADER || &b[..8] != MAGIC {
            return Err(IndexError::Magic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let params = ChunkParams { min: u32_at(8), avg: u32_at(12), max: u32_at(16) };
        let image_size = u64_at(20);
        let count = u64_at(28);
        let expected = (HEADER as u64)
            .checked_add(count.checked_mul(ENTRY as u64).ok_or(IndexError::Invalid("chunk count overflows".into()))?);
        if expected != Some(b.len() as u64) {
            return Err(IndexError::Length { expected: expected.unwrap_or(u64::MAX), found: b.len() as u64 });
        }
        if params.min == 0 || params.min > params.avg || params.avg > params.max {
            return Err(IndexError::Invalid(format!("chunk limits {}/{}/{}", params.min, params.avg, params.max)));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut offset = 0u64;
        for (i, e) in b[HEADER..].chunks_exact(ENTRY).enumerate() {
            let len = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
            let last = i as u64 + 1 == count;
            if len == 0 || len > params.max || (!last && len < params.min) {
                return Err(IndexError::Invalid(format!(
                    "chunk {i} is {len} bytes, outside {}..={}",
                    params.min, params.max
                )));
            }
            chunks.push(Chunk { offset, len, hash: ChunkHash(e[4..].try_into().expect("16 bytes")) });
            offset += len as u64;
        }
        if offset != image_size {
            return Err(IndexError::Invalid(format!("chunks cover {offset} bytes, the image has {image_size}")));
        }
        Ok(ChunkIndex { params, image_size, chunks })
    }

    /// The published (zstd-compressed) form.
    pub fn encode(&self) -> Vec<u8> {
        zstd::bulk::compress(&self.to_bytes(), 19).expect("compressing into memory cannot fail")
    }

    /// Decompresses (at most [`MAX_INDEX_BYTES`], bounded as
    /// [`crate::compress::decode_bounded`] says) and parses the published form.
    pub fn decode(compressed: &[u8]) -> Result<Self, IndexError> {
        let raw = crate::compress::decode_bounded(compressed, MAX_INDEX_BYTES).map_err(IndexError::Compression)?;
        Self::parse(&raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        crate::test_noise(n, seed | 1)
    }

    #[test]
    fn build_round_trip_and_locality() {
        let a = data(3 << 20, 7);
        let (ia, sha, size) = ChunkIndex::build(&a[..], ChunkParams::default()).unwrap();
        assert_eq!((sha, size), (Sha256Digest::of_bytes(&a), a.len() as u64));
        assert_eq!(ChunkIndex::decode(&ia.encode()).unwrap(), ia);
        // An insertion changes only the chunks around it.
        let mut b = a.clone();
        b.splice(1_000_000..1_000_000, data(5000, 9));
        let (ib, _, _) = ChunkIndex::build(&b[..], ChunkParams::default()).unwrap();
        let old: std::collections::HashSet<_> = ia.chunks.iter().map(|c| c.hash).collect();
        let new_bytes: u64 = ib.chunks.iter().filter(|c| !old.contains(&c.hash)).map(|c| c.len as u64).sum();
        assert!(new_bytes < 300_000, "{new_bytes} new bytes for a 5000-byte insertion");
    }

    #[test]
    fn checkpoints_are_the_states_of_the_prefixes_wherever_chunks_cut() {
        let a = data(3 << 20, 11);
        // At 0, inside chunks, on the same offset twice, out of order, at
        // the end, and past it.
        let at = [0, 64, 4096, 1 << 20, 1 << 20, 4096, (3 << 20) - 64, 3 << 20, 4 << 20];
        let (_, sha, size, cps) = ChunkIndex::build_with_checkpoints(&a[..], ChunkParams::default(), &at).unwrap();
        assert_eq!((sha, size), (Sha256Digest::of_bytes(&a), a.len() as u64));
        let got: Vec<u64> = cps.iter().map(|c| c.at).collect();
        assert_eq!(got, [0, 64, 4096, 1 << 20, (3 << 20) - 64, 3 << 20]);
        for cp in &cps {
            let mut h = ResumableSha256::new();
            h.update(&a[..cp.at as usize]);
            assert_eq!(h.checkpoint().as_ref(), Some(cp), "at {}", cp.at);
            let mut rest = ResumableSha256::resume(cp).unwrap();
            rest.update(&a[cp.at as usize..]);
            assert_eq!(rest.finish(), (sha, size), "from {}", cp.at);
        }
    }

    #[test]
    fn rejects_malformed_indexes() {
        let (idx, _, _) = ChunkIndex::build(&data(1 << 20, 3)[..], ChunkParams::default()).unwrap();
        let good = idx.to_bytes();
        assert!(ChunkIndex::parse(&good).is_ok());
        assert_eq!(
            ChunkIndex::parse(&good[..good.len() - 1]).unwrap_err(),
            IndexError::Length { expected: good.len() as u64, found: good.len() as u64 - 1 }
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(ChunkIndex::parse(&bad), Err(IndexError::Magic));
        let mut bad = good.clone();
        bad[20] ^= 1; // image size
        assert!(matches!(ChunkIndex::parse(&bad), Err(IndexError::Invalid(_))));
        let mut bad = good.clone();
        bad[28..36].copy_from_slice(&u64::MAX.to_le_bytes()); // absurd count
        assert!(ChunkIndex::parse(&bad).is_err());
        let mut bad = good.clone();
        bad[HEADER..HEADER + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(ChunkIndex::parse(&bad).is_err());
        assert!(ChunkIndex::decode(b"not zstd").is_err());
    }

    /// The expansion limit is inclusive: exactly MAX_INDEX_BYTES decodes
    /// (and then fails to parse, being zeros); one byte more is refused.
    #[test]
    fn decode_limit_is_exact() {
        let at_limit = zstd::bulk::compress(&vec![0u8; MAX_INDEX_BYTES], 3).unwrap();
        assert_eq!(ChunkIndex::decode(&at_limit), Err(IndexError::Magic));
        let over = zstd::bulk::compress(&vec![0u8; MAX_INDEX_BYTES + 1], 3).unwrap();
        assert!(matches!(ChunkIndex::decode(&over), Err(IndexError::Compression(_))));
    }

    /// Every bound of `parse`, on both sides.
    #[test]
    fn parse_bounds() {
        let raw = |min: u32, avg: u32, max: u32, lens: &[u32]| {
            let chunks = lens.iter().map(|&len| Chunk { offset: 0, len, hash: ChunkHash([7; HASH]) }).collect();
            let image_size = lens.iter().map(|&l| u64::from(l)).sum();
            ChunkIndex { params: ChunkParams { min, avg, max }, image_size, chunks }.to_bytes()
        };
        let ok = |b: Vec<u8>| ChunkIndex::parse(&b).unwrap();
        let invalid = |b: Vec<u8>| assert!(matches!(ChunkIndex::parse(&b), Err(IndexError::Invalid(_))));
        // An empty image: the header alone.
        let empty = raw(4, 8, 16, &[]);
        assert_eq!(empty.len(), HEADER);
        assert!(ok(empty).chunks.is_empty());
        assert_eq!(ChunkIndex::parse(&raw(4, 8, 16, &[])[..HEADER - 1]), Err(IndexError::Magic));
        // Chunk limits: min > 0, min <= avg <= max.
        invalid(raw(0, 8, 16, &[]));
        invalid(raw(9, 8, 16, &[]));
        invalid(raw(4, 17, 16, &[]));
        ok(raw(8, 8, 8, &[8]));
        // Chunk sizes: 1..=max, and at least min except the last.
        ok(raw(4, 8, 16, &[16, 4, 3]));
        invalid(raw(4, 8, 16, &[17, 4]));
        invalid(raw(4, 8, 16, &[3, 4]));
        invalid(raw(4, 8, 16, &[4, 0]));
        // Offsets follow the lengths.
        let idx = ok(raw(4, 8, 16, &[16, 4, 3]));
        assert_eq!(idx.chunks.iter().map(|c| c.offset).collect::<Vec<_>>(), [0, 16, 20]);
        assert_eq!(idx.image_size, 23);
    }

    /// Regression (fuzzing): a tiny input that expands beyond the limit is
    /// refused without holding more than the limit.
    #[test]
    fn decompression_bomb_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_INDEX_BYTES + 1024], 3).unwrap();
        assert!(bomb.len() < 10_000);
        let r = ChunkIndex::decode(&bomb);
        assert!(matches!(&r, Err(IndexError::Compression(m)) if m.contains("beyond")), "{r:?}");
        // A frame that asks for a window over the bound is refused, not allocated.
        // (Streamed without a pledged size, so the header keeps the 128 MiB window.)
        let mut wide = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        wide.window_log(27).unwrap();
        std::io::Write::write_all(&mut wide, &vec![7u8; 1 << 20]).unwrap();
        let frame = wide.finish().unwrap();
        let r = ChunkIndex::decode(&frame);
        assert!(matches!(&r, Err(IndexError::Compression(_))), "{r:?}");
        assert!(matches!(ChunkIndex::decode(b"not zstd"), Err(IndexError::Compression(m)) if m == "not a zstd frame"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ChunkIndex::parse(&bytes);
        }
    }
}
