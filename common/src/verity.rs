//! dm-verity hash trees: every block of a mounted image is checked against
//! the signed root hash when the kernel reads it, not only once at install.
//!
//! `imgbuild build` appends the tree to the image file in exactly the layout
//! `veritysetup format --hash-offset=OFFSET` writes (a 512-byte verity
//! superblock at `OFFSET`, padded to a 4096-byte block, then the hash levels,
//! top level first), so `veritysetup verify IMAGE IMAGE ROOT_HASH
//! --hash-offset=OFFSET` checks an image with no tool of ours. The squashfs
//! filesystem ignores what follows its `bytes_used`, so the same file mounts
//! with or without dm-verity under it.
//!
//! Everything is reproducible: the salt is the same for every image
//! ([`image_salt`]) and the superblock's UUID is derived from it, so the
//! same tree always gives the same image bytes. A data block two images
//! share has the same hash in both trees, so a deployer that copied blocks
//! from the old image takes their hashes from the old tree
//! ([`write_tree_beside`]'s `known`) instead of hashing them again.
//!
//! The root hash, salt and offset are in the signed manifest ([`Verity`]);
//! the deployer builds the dm-verity table from them, never from the
//! superblock (which, like any byte on the frontend's disk, is untrusted).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::Sha256Digest;

/// Data and hash block size: the page size, as dm-verity and squashfs's
/// 4 KiB padding both want.
pub const BLOCK_SIZE: u64 = 4096;
/// sha256 digests per hash block.
const HASHES_PER_BLOCK: u64 = BLOCK_SIZE / 32;
/// The only hash algorithm.
pub const HASH: &str = "sha256";

/// Blocks read and hashed per batch by [`write_tree`] (8 MiB; unit tests
/// use 4, so their trees cross batches on every level).
const BATCH_BLOCKS: usize = if cfg!(test) { 4 } else { 2048 };
/// What the salt is the sha256 of ([`image_salt`]).
const SALT_DOMAIN: &[u8] = b"imgdeploy dm-verity salt v2\0";
/// The verity superblock's size on disk (padded to [`BLOCK_SIZE`]).
const SUPERBLOCK_BYTES: usize = 512;

/// How the image's hash tree is laid out and what its root is: the signed
/// manifest's `image.verity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verity {
    /// The hash of the tree's top block (with the salt).
    pub root_hash: Sha256Digest,
    /// 32 bytes prepended to every hashed block (dm-verity format 1).
    pub salt: Sha256Digest,
    /// Where the data area ends and the verity superblock starts; the tree
    /// starts one block later.
    pub hash_offset: u64,
    /// Always [`BLOCK_SIZE`].
    pub data_block_size: u32,
    /// Always [`BLOCK_SIZE`].
    pub hash_block_size: u32,
    /// Always [`HASH`].
    pub hash: String,
}

/// A [`Verity`] that cannot describe an image of the signed size.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {why}")]
pub struct BadVerity {
    /// The offending field, as the manifest names it (`image.verity.hash`).
    pub field: &'static str,
    /// Why.
    pub why: String,
}

impl Verity {
    /// Data blocks the tree covers.
    pub fn data_blocks(&self) -> u64 {
        self.hash_offset / BLOCK_SIZE
    }

    /// The first block of the hash levels, counted from the start of the file
    /// (the device dm-verity reads hashes from is the image itself).
    pub fn hash_start_block(&self) -> u64 {
        self.hash_offset / BLOCK_SIZE + 1
    }

    /// Where the bottom level (one hash per data block, in order) starts in
    /// the file: after the levels above it, which come first. None for a
    /// single data block, whose hash is the root.
    pub fn leaves_offset(&self) -> Option<u64> {
        let sizes = levels(self.data_blocks());
        let above: u64 = sizes.get(1..)?.iter().sum();
        Some(self.hash_offset + BLOCK_SIZE + above * BLOCK_SIZE)
    }

    /// Checks that the parameters are ours and describe an image of
    /// exactly `image_size` bytes: data, superblock, then the tree.
    pub fn validate(&self, image_size: u64) -> Result<(), BadVerity> {
        let bad = |field, why: String| Err(BadVerity { field, why });
        if self.hash != HASH {
            return bad("image.verity.hash", format!("`{}` is not `{HASH}`", self.hash));
        }
        if u64::from(self.data_block_size) != BLOCK_SIZE {
            return bad("image.verity.data_block_size", format!("{} is not {BLOCK_SIZE}", self.data_block_size));
        }
        if u64::from(self.hash_block_size) != BLOCK_SIZE {
            return bad("image.verity.hash_block_size", format!("{} is not {BLOCK_SIZE}", self.hash_block_size));
        }
        if self.hash_offset == 0 || self.hash_offset % BLOCK_SIZE != 0 {
            return bad(
                "image.verity.hash_offset",
                format!("{} is not a positive multiple of {BLOCK_SIZE}", self.hash_offset),
            );
        }
        let want = expected_image_size(self.data_blocks());
        if want != Some(image_size) {
            return bad(
                "image.verity.hash_offset",
                format!(
                    "{} data bytes and their tree make no image of the signed {image_size} bytes",
                    self.hash_offset
                ),
            );
        }
        Ok(())
    }

    /// The dm-verity target's parameters over `device` (`major:minor`),
    /// which holds both the data and the tree. No `restart_on_corruption`
    /// or `panic_on_corruption`: a bad block is an I/O error for the reader.
    pub fn table_params(&self, device: &str) -> String {
        format!(
            "1 {device} {device} {BLOCK_SIZE} {BLOCK_SIZE} {} {} {HASH} {} {}",
            self.data_blocks(),
            self.hash_start_block(),
            self.root_hash,
            self.salt
        )
    }
}

/// Blocks in each hash level, bottom (leaves) first. Like veritysetup, a
/// single data block has no level at all: its own hash is the root.
fn levels(data_blocks: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut n = data_blocks;
    // A u64 count of blocks shrinks 128-fold per level: 10 levels at most.
    for _ in 0..64 {
        if n <= 1 {
            break;
        }
        n = n.div_ceil(HASHES_PER_BLOCK);
        out.push(n);
    }
    out
}

/// The size of an image with `data_blocks` of data and its tree, or `None`
/// for no data or an absurd count.
pub fn expected_image_size(data_blocks: u64) -> Option<u64> {
    if data_blocks == 0 {
        return None;
    }
    let tree: u64 = levels(data_blocks).iter().sum();
    data_blocks.checked_add(1)?.checked_add(tree)?.checked_mul(BLOCK_SIZE)
}

fn salted(salt: &Sha256Digest, block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt.0);
    h.update(block);
    h.finalize().into()
}

/// The salt of every image's tree: the sha256 of a fixed string. The same
/// for all images, so that a block two images share has one hash in both
/// trees. (It used to be the data's own sha256, which made every hash of
/// every image differ.) dm-verity's salt is no secret: it is in the signed
/// manifest and on the disk, and sha256 needs no salt to resist second
/// preimages.
pub fn image_salt() -> Sha256Digest {
    Sha256Digest::of_bytes(SALT_DOMAIN)
}

/// The salted hashes of `bytes`' blocks, split across `threads`.
fn hash_blocks(bytes: &[u8], salt: &Sha256Digest, threads: usize) -> Vec<u8> {
    let n = bytes.chunks(BLOCK_SIZE as usize).len();
    hash_unknown(bytes, salt, threads, vec![0u8; n * 32], &[])
}

/// [`hash_blocks`] into `out`, leaving alone the hashes of the blocks
/// `known` flags (all are hashed when it is empty).
fn hash_unknown(bytes: &[u8], salt: &Sha256Digest, threads: usize, mut out: Vec<u8>, known: &[bool]) -> Vec<u8> {
    let n = bytes.chunks(BLOCK_SIZE as usize).len();
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts = bytes.chunks(per * BLOCK_SIZE as usize).zip(out.chunks_mut(per * 32));
        for (t, (blocks, hashes)) in parts.enumerate() {
            let known = known.get(t * per..).unwrap_or_default();
            s.spawn(move || hash_leaves(blocks, salt, hashes, known));
        }
    });
    out
}

/// The salted hashes of `bytes`' blocks (the last may be short) into
/// `hashes`, 32 bytes each, on this thread; the blocks `known` flags (none
/// when it is empty or short) keep the hash `hashes` holds.
pub fn hash_leaves(bytes: &[u8], salt: &Sha256Digest, hashes: &mut [u8], known: &[bool]) {
    for (i, (block, hash)) in bytes.chunks(BLOCK_SIZE as usize).zip(hashes.chunks_mut(32)).enumerate() {
        if !known.get(i).copied().unwrap_or(false) {
            hash.copy_from_slice(&salted(salt, block));
        }
    }
}

/// Where each hash level of a tree over `data_blocks` starts in the file,
/// bottom (the data's hashes) first: the top level is on disk first, one
/// block after the superblock.
fn level_starts(data_blocks: u64, sizes: &[u64]) -> Vec<u64> {
    let mut starts = vec![0u64; sizes.len()];
    let mut at = (data_blocks + 1) * BLOCK_SIZE;
    for (start, blocks) in starts.iter_mut().zip(sizes).rev() {
        *start = at;
        at += blocks * BLOCK_SIZE;
    }
    starts
}

/// Hashes `data_blocks` blocks read from `data` (the image's data area) and
/// writes the superblock and the hash levels after them in `file`, as
/// `veritysetup format --hash-offset` lays them out (top level first);
/// returns the root hash. What the builder appends, and what a deployer
/// that computes the tree itself writes (whatever bytes the tail held
/// before, padding included).
///
/// Memory stays the same for any image size: each level is written to its
/// place as it is hashed, and read back from there to hash the level above,
/// [`BATCH_BLOCKS`] blocks (8 MiB) at a time, split across the cores.
pub fn write_tree(file: &File, data: impl Read, data_blocks: u64, salt: &Sha256Digest) -> io::Result<Sha256Digest> {
    write_tree_beside(file, data, data_blocks, salt, None, None)
}

/// What sees each batch of the data beside the tree ([`write_tree_beside`]).
pub type Beside<'a> = &'a mut (dyn FnMut(&[u8]) + Send);

/// Data blocks' hashes the caller already has ([`write_tree_beside`]):
/// called for each batch with its first block, a 32-byte place per block
/// of the batch and a flag per block, it writes the hashes it knows into
/// their places and sets their flags; only the other blocks are hashed. A
/// wrong hash given here gives another root.
pub type Known<'a> = &'a mut dyn FnMut(u64, &mut [u8], &mut [bool]) -> io::Result<()>;

/// [`write_tree`], also handing every batch of the data, in order, to
/// `beside`, which runs on a core of its own while the batch's blocks are
/// hashed on the others: a deployer hashes the whole image in the same
/// read. The next batch is read while one is hashed. The blocks whose
/// hashes `known` gives are not hashed.
pub fn write_tree_beside(
    file: &File,
    mut data: impl Read,
    data_blocks: u64,
    salt: &Sha256Digest,
    mut beside: Option<Beside<'_>>,
    mut known: Option<Known<'_>>,
) -> io::Result<Sha256Digest> {
    let sizes = levels(data_blocks);
    let leaves_at = level_starts(data_blocks, &sizes).first().copied();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    let hashers = if beside.is_some() { threads.saturating_sub(1).max(1) } else { threads };
    let batch = |done: u64| (data_blocks - done).min(BATCH_BLOCKS as u64) as usize * BLOCK_SIZE as usize;
    let mut buf = vec![0u8; BATCH_BLOCKS * BLOCK_SIZE as usize];
    let mut next = vec![0u8; buf.len()];
    data.read_exact(&mut buf[..batch(0)])?;
    // The data's hashes: the bottom level, or the root for one block.
    let mut first = [0u8; 32];
    for done in (0..data_blocks).step_by(BATCH_BLOCKS) {
        let bytes = &buf[..batch(done)];
        let ahead = done + BATCH_BLOCKS as u64;
        let n = bytes.chunks(BLOCK_SIZE as usize).len();
        let (mut given, mut flags) = (vec![0u8; n * 32], Vec::new());
        if let Some(k) = known.as_deref_mut() {
            flags = vec![false; n];
            k(done, &mut given, &mut flags)?;
        }
        let flags = &flags;
        let (hashes, read) = std::thread::scope(|s| {
            if let Some(f) = beside.as_deref_mut() {
                s.spawn(move || f(bytes));
            }
            let hashing = s.spawn(move || hash_unknown(bytes, salt, hashers, given, flags));
            let read = data.read_exact(&mut next[..batch(ahead.min(data_blocks))]);
            (hashing.join().expect("hashing does not panic"), read)
        });
        read?;
        std::mem::swap(&mut buf, &mut next);
        if done == 0 {
            first.copy_from_slice(&hashes[..32]);
        }
        if let Some(at) = leaves_at {
            file.write_all_at(&hashes, at + done * 32)?;
        }
    }
    drop((buf, next));
    match leaves_at {
        Some(_) => write_levels_above(file, data_blocks, salt),
        None => {
            write_superblock(file, data_blocks, salt)?;
            Ok(Sha256Digest(first))
        }
    }
}

/// Writes the superblock and the levels above the bottom one, which must
/// already be in its place ([`Verity::leaves_offset`]), and returns the
/// root hash: the end of [`write_tree`] for a caller that hashed the data
/// blocks itself ([`hash_leaves`]), on as many threads as it liked. An
/// error for a single data block, whose hash is the root.
pub fn write_levels_above(file: &File, data_blocks: u64, salt: &Sha256Digest) -> io::Result<Sha256Digest> {
    let sizes = levels(data_blocks);
    let starts = level_starts(data_blocks, &sizes);
    if sizes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a single data block has no hash levels"));
    }
    write_superblock(file, data_blocks, salt)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    let mut buf = vec![0u8; BATCH_BLOCKS * BLOCK_SIZE as usize];
    // Each level: its hashes padded with zeros to whole blocks, then the
    // hashes of those blocks written into the level above.
    let mut hashes_in = data_blocks;
    for (k, (&start, &blocks)) in starts.iter().zip(&sizes).enumerate() {
        let used = hashes_in * 32;
        file.write_all_at(&vec![0u8; (blocks * BLOCK_SIZE - used) as usize], start + used)?;
        let Some(&above) = starts.get(k + 1) else {
            // The top level is one block: its hash is the root.
            let top = &mut buf[..BLOCK_SIZE as usize];
            file.read_exact_at(top, start)?;
            return Ok(Sha256Digest(salted(salt, top)));
        };
        for done in (0..blocks).step_by(BATCH_BLOCKS) {
            let n = (blocks - done).min(BATCH_BLOCKS as u64) as usize;
            let bytes = &mut buf[..n * BLOCK_SIZE as usize];
            file.read_exact_at(bytes, start + done * BLOCK_SIZE)?;
            file.write_all_at(&hash_blocks(bytes, salt, threads), above + done * 32)?;
        }
        hashes_in = blocks;
    }
    unreachable!("the last level is one block")
}

/// The superblock, padded to a block, where the data ends.
fn write_superblock(file: &File, data_blocks: u64, salt: &Sha256Digest) -> io::Result<()> {
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    block[..SUPERBLOCK_BYTES].copy_from_slice(&superblock(data_blocks, salt));
    file.write_all_at(&block, data_blocks * BLOCK_SIZE)
}

/// A UUID for the superblock, derived from the salt (version 4 and variant
/// bits set, as `veritysetup` would accept from `--uuid`).
pub fn uuid_of(salt: &Sha256Digest) -> [u8; 16] {
    let d = Sha256::digest([b"imgdeploy dm-verity uuid v1\0".as_slice(), &salt.0].concat());
    let mut u: [u8; 16] = d[..16].try_into().expect("16 of 32 bytes");
    // The high bits are cleared first, so `+` sets them.
    u[6] = (u[6] & 0x0f) + 0x40;
    u[8] = (u[8] & 0x3f) + 0x80;
    u
}

/// The verity superblock `veritysetup format` writes (format 1, sha256).
pub fn superblock(data_blocks: u64, salt: &Sha256Digest) -> [u8; SUPERBLOCK_BYTES] {
    let mut sb = [0u8; SUPERBLOCK_BYTES];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal (salt first)
    sb[16..32].copy_from_slice(&uuid_of(salt));
    sb[32..32 + HASH.len()].copy_from_slice(HASH.as_bytes());
    sb[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&32u16.to_le_bytes());
    sb[88..120].copy_from_slice(&salt.0);
    sb
}

/// Appends the superblock and hash tree to an image whose data fills the
/// whole file (a multiple of [`BLOCK_SIZE`]) and returns what the manifest
/// signs. The caller syncs the file.
pub fn append_tree(file: &mut File) -> io::Result<Verity> {
    let data_len = file.metadata()?.len();
    if data_len == 0 || data_len % BLOCK_SIZE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an image of {data_len} bytes is not a whole number of {BLOCK_SIZE}-byte blocks"),
        ));
    }
    let data_blocks = data_len / BLOCK_SIZE;
    let salt = image_salt();
    file.seek(SeekFrom::Start(0))?;
    let data = io::BufReader::with_capacity(1 << 20, (&*file).take(data_len));
    let root_hash = write_tree(file, data, data_blocks, &salt)?;
    Ok(Verity {
        root_hash,
        salt,
        hash_offset: data_len,
        data_block_size: BLOCK_SIZE as u32,
        hash_block_size: BLOCK_SIZE as u32,
        hash: HASH.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_veritysetup() {
        assert_eq!(levels(0), Vec::<u64>::new());
        assert_eq!(levels(1), Vec::<u64>::new());
        assert_eq!(levels(u64::MAX).len(), 10);
        assert_eq!(levels(2), vec![1]);
        assert_eq!(levels(128), vec![1]);
        assert_eq!(levels(129), vec![2, 1]);
        assert_eq!(levels(300), vec![3, 1]);
        assert_eq!(levels(128 * 128), vec![128, 1]);
        assert_eq!(levels(128 * 128 + 1), vec![129, 2, 1]);
        // veritysetup format on 300 blocks: 1 superblock + 4 hash blocks.
        assert_eq!(expected_image_size(300), Some(305 * 4096));
        assert_eq!(expected_image_size(1), Some(2 * 4096));
        assert_eq!(expected_image_size(0), None);
        // From 64 MiB of data up, the superblock and tree add at most 0.8%.
        for mib in [64u64, 211, 1024, 5 << 10, 1 << 20] {
            let blocks = mib << 8;
            let extra = expected_image_size(blocks).unwrap() - blocks * 4096;
            assert!(extra * 1000 <= blocks * 4096 * 8, "{mib} MiB: {extra} bytes of tree");
        }
        assert_eq!(expected_image_size(u64::MAX / 4096), None);
    }

    fn noise(blocks: usize) -> Vec<u8> {
        crate::test_noise(blocks * BLOCK_SIZE as usize, 0x9e37_79b9_7f4a_7c15)
    }

    /// Distinct blocks, cheap to make in a debug build: each starts with its
    /// own number and is zeros after it (64 MiB of noise would take seconds).
    fn stamped(blocks: usize) -> Vec<u8> {
        let mut data = vec![0u8; blocks * BLOCK_SIZE as usize];
        for (i, block) in data.chunks_mut(BLOCK_SIZE as usize).enumerate() {
            block[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
        data
    }

    /// The tree [`write_tree`] writes after `data` (top level first), and
    /// the root hash.
    fn hash_tree(data: &[u8], blocks: u64, salt: &Sha256Digest) -> io::Result<(Vec<u8>, Sha256Digest)> {
        let file = tempfile::tempfile()?;
        file.write_all_at(data, 0)?;
        let root = write_tree(&file, data, blocks, salt)?;
        // The length first: a tree written past its place would be a huge
        // sparse file to read.
        let size = expected_image_size(blocks).unwrap();
        assert_eq!(file.metadata()?.len(), size, "{blocks} blocks: the image's size");
        let mut tree = vec![0u8; (size - (blocks + 1) * 4096) as usize];
        file.read_exact_at(&mut tree, (blocks + 1) * 4096)?;
        Ok((tree, root))
    }

    #[test]
    fn leaves_hashed_in_pieces_by_the_caller_give_the_same_image_and_root() {
        let salt = image_salt();
        for blocks in [2usize, 5, 129, 300] {
            let data = stamped(blocks);
            let whole = tempfile::tempfile().unwrap();
            whole.write_all_at(&data, 0).unwrap();
            let root = write_tree(&whole, &data[..], blocks as u64, &salt).unwrap();
            let file = tempfile::tempfile().unwrap();
            file.write_all_at(&data, 0).unwrap();
            // Two pieces, as two threads would hash them; a hash the caller
            // knows is kept as given.
            let mut hashes = vec![0u8; blocks * 32];
            hashes[32..64].copy_from_slice(&salted(&salt, &data[4096..8192]));
            let cut = blocks / 2;
            hash_leaves(&data[..cut * 4096], &salt, &mut hashes[..cut * 32], &[false, true]);
            hash_leaves(&data[cut * 4096..], &salt, &mut hashes[cut * 32..], &[]);
            let v = Verity { hash_offset: blocks as u64 * 4096, root_hash: root, ..good_verity() };
            file.write_all_at(&hashes, v.leaves_offset().unwrap()).unwrap();
            assert_eq!(write_levels_above(&file, blocks as u64, &salt).unwrap(), root, "{blocks} blocks");
            // The lengths first: a tree written past its place would be a
            // huge sparse file to read.
            let size = expected_image_size(blocks as u64).unwrap();
            assert_eq!((whole.metadata().unwrap().len(), file.metadata().unwrap().len()), (size, size));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            (&whole).read_to_end(&mut a).unwrap();
            (&file).read_to_end(&mut b).unwrap();
            assert!(a == b, "{blocks} blocks: another image");
            // A wrong leaf given: another root.
            let mut wrong = hashes.clone();
            wrong[blocks * 32 - 1] ^= 1;
            file.write_all_at(&wrong, v.leaves_offset().unwrap()).unwrap();
            assert_ne!(write_levels_above(&file, blocks as u64, &salt).unwrap(), root, "{blocks} blocks");
        }
        // A known flag keeps the given hash, even a wrong one.
        let data = stamped(2);
        let mut given = vec![7u8; 64];
        hash_leaves(&data, &salt, &mut given, &[true]);
        assert_eq!((&given[..32], &given[32..]), (&[7u8; 32][..], &salted(&salt, &data[4096..])[..]));
        let e = write_levels_above(&tempfile::tempfile().unwrap(), 1, &salt).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// The tree recomputed naively, level by level, from the definition.
    fn naive_root(data: &[u8], salt: &Sha256Digest) -> Sha256Digest {
        let mut level: Vec<u8> = data.chunks(4096).flat_map(|b| salted(salt, b)).collect();
        if data.len() == 4096 {
            return Sha256Digest(level[..32].try_into().unwrap());
        }
        loop {
            let blocks = level.len().div_ceil(4096);
            level.resize(blocks * 4096, 0);
            let up: Vec<u8> = level.chunks(4096).flat_map(|b| salted(salt, b)).collect();
            if blocks == 1 {
                return Sha256Digest(up[..32].try_into().unwrap());
            }
            level = up;
        }
    }

    #[test]
    fn root_hash_follows_the_definition() {
        let salt = Sha256Digest([7; 32]);
        for blocks in [1usize, 2, 127, 128, 129, 300, 16_385] {
            let data = if blocks < 1000 { noise(blocks) } else { stamped(blocks) };
            let (tree, root) = hash_tree(&data[..], blocks as u64, &salt).unwrap();
            assert_eq!(root, naive_root(&data, &salt), "{blocks} blocks");
            let size = expected_image_size(blocks as u64).unwrap();
            assert_eq!(tree.len() as u64, size - (blocks as u64 + 1) * 4096, "{blocks} blocks");
        }
    }

    #[test]
    fn the_tree_overwrites_whatever_the_tail_held() {
        // A deployer's partial file may hold another image's bytes there.
        let salt = Sha256Digest([3; 32]);
        let data = noise(300);
        let (clean, root) = hash_tree(&data, 300, &salt).unwrap();
        let file = tempfile::tempfile().unwrap();
        let size = expected_image_size(300).unwrap();
        file.write_all_at(&vec![0xa5; size as usize], 0).unwrap();
        file.write_all_at(&data, 0).unwrap();
        assert_eq!(write_tree(&file, &data[..], 300, &salt).unwrap(), root);
        assert_eq!(file.metadata().unwrap().len(), size);
        let mut all = vec![0u8; size as usize];
        file.read_exact_at(&mut all, 0).unwrap();
        assert!(all[301 * 4096..] == clean[..], "the tree differs from one written into a clean file");
        assert!(
            all[300 * 4096..301 * 4096] == {
                let mut b = vec![0u8; 4096];
                b[..512].copy_from_slice(&superblock(300, &salt));
                b
            }
        );
        // Data that ends early is an error.
        assert!(write_tree(&file, &data[..4096 * 299], 300, &salt).is_err());
    }

    #[test]
    fn beside_sees_every_byte_of_the_data_in_order_and_the_tree_is_the_same() {
        let salt = Sha256Digest([5; 32]);
        for blocks in [1usize, 4, 5, 301] {
            let data = noise(blocks);
            let (clean, root) = hash_tree(&data, blocks as u64, &salt).unwrap();
            let file = tempfile::tempfile().unwrap();
            file.write_all_at(&data, 0).unwrap();
            let (mut seen, mut calls) = (Vec::new(), 0);
            let mut beside = |b: &[u8]| {
                seen.extend_from_slice(b);
                calls += 1;
            };
            assert_eq!(
                write_tree_beside(&file, &data[..], blocks as u64, &salt, Some(&mut beside), None).unwrap(),
                root
            );
            assert!(seen == data, "{blocks} blocks: beside saw other bytes");
            assert_eq!(calls, blocks.div_ceil(BATCH_BLOCKS), "one call per batch");
            let mut tail = vec![0u8; clean.len()];
            file.read_exact_at(&mut tail, (blocks as u64 + 1) * 4096).unwrap();
            assert!(tail == clean, "{blocks} blocks: the tree differs");
            // Data that ends early is an error, in the first batch or a later one.
            let short = &data[..data.len() - 1];
            assert!(write_tree_beside(&file, short, blocks as u64, &salt, Some(&mut |_: &[u8]| ()), None).is_err());
        }
    }

    #[test]
    fn top_level_comes_first_and_holds_the_leaf_blocks_hashes() {
        let salt = Sha256Digest([1; 32]);
        let data = noise(300);
        let (tree, root) = hash_tree(&data[..], 300, &salt).unwrap();
        let (top, leaves) = tree.split_at(4096);
        assert_eq!(salted(&salt, top), root.0);
        assert_eq!(&leaves[..32], &salted(&salt, &data[..4096]));
        for (i, leaf_block) in leaves.chunks(4096).enumerate() {
            assert_eq!(&top[i * 32..i * 32 + 32], &salted(&salt, leaf_block));
        }
        assert!(top[3 * 32..].iter().all(|&b| b == 0), "padding is zeros");
        // 300 leaves: the last leaf block holds 44 hashes, then zeros.
        assert!(leaves[300 * 32..].iter().all(|&b| b == 0));
        assert!(leaves[299 * 32..300 * 32].iter().any(|&b| b != 0));
    }

    #[test]
    fn a_changed_byte_changes_the_root() {
        let data = noise(200);
        let salt = image_salt();
        let mut other = data.clone();
        other[4096 * 150 + 9] ^= 1;
        let a = hash_tree(&data[..], 200, &salt).unwrap().1;
        let b = hash_tree(&other[..], 200, &salt).unwrap().1;
        assert_ne!(a, b);
    }

    #[test]
    fn every_image_gets_the_same_salt_so_shared_blocks_share_hashes() {
        // Pinned: another salt would make every hash of the next image
        // differ from the last one's.
        assert_eq!(image_salt(), Sha256Digest::of_bytes(b"imgdeploy dm-verity salt v2\0"));
        let dir = tempfile::tempdir().unwrap();
        let tree_of = |data: &[u8]| {
            let p = dir.path().join("img");
            std::fs::write(&p, data).unwrap();
            let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let v = append_tree(&mut f).unwrap();
            let mut leaves = vec![0u8; data.len() / 4096 * 32];
            f.read_exact_at(&mut leaves, v.leaves_offset().unwrap()).unwrap();
            (v, leaves)
        };
        let data = noise(300);
        let mut other = data.clone();
        other[4096 * 150 + 9] ^= 1;
        let (a, la) = tree_of(&data);
        let (b, lb) = tree_of(&other);
        assert_eq!((a.salt, b.salt), (image_salt(), image_salt()));
        assert_ne!(a.root_hash, b.root_hash);
        // One leaf differs: block 150's.
        let differ: Vec<usize> = (0..300).filter(|i| la[i * 32..i * 32 + 32] != lb[i * 32..i * 32 + 32]).collect();
        assert_eq!(differ, [150]);
    }

    #[test]
    fn leaves_offset_is_where_the_data_blocks_hashes_are() {
        for blocks in [2usize, 128, 129, 300, 16_385] {
            let data = if blocks < 1000 { noise(blocks) } else { stamped(blocks) };
            let file = tempfile::tempfile().unwrap();
            file.write_all_at(&data, 0).unwrap();
            let salt = image_salt();
            write_tree(&file, &data[..], blocks as u64, &salt).unwrap();
            let v = Verity {
                root_hash: Sha256Digest([0; 32]),
                salt,
                hash_offset: data.len() as u64,
                data_block_size: 4096,
                hash_block_size: 4096,
                hash: HASH.into(),
            };
            let at = v.leaves_offset().unwrap();
            let mut leaves = vec![0u8; blocks * 32];
            file.read_exact_at(&mut leaves, at).unwrap();
            for (i, block) in data.chunks(4096).enumerate() {
                assert_eq!(leaves[i * 32..i * 32 + 32], salted(&salt, block), "{blocks} blocks: block {i}");
            }
            // The level ends where the image does.
            assert_eq!(at + (blocks as u64 * 32).next_multiple_of(4096), expected_image_size(blocks as u64).unwrap());
        }
        let one = Verity { hash_offset: 4096, ..good_verity() };
        assert_eq!(one.leaves_offset(), None, "one block: no level, its hash is the root");
    }

    fn good_verity() -> Verity {
        Verity {
            root_hash: Sha256Digest([0; 32]),
            salt: Sha256Digest([0; 32]),
            hash_offset: 300 * 4096,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash: HASH.into(),
        }
    }

    #[test]
    fn known_hashes_are_taken_and_only_the_other_blocks_hashed() {
        let salt = image_salt();
        let blocks = 301usize;
        let data = noise(blocks);
        let (clean, root) = hash_tree(&data, blocks as u64, &salt).unwrap();
        let truth: Vec<[u8; 32]> = data.chunks(4096).map(|b| salted(&salt, b)).collect();
        // Given: every third block's true hash, or one of them wrong.
        for wrong in [None, Some(150u64)] {
            let file = tempfile::tempfile().unwrap();
            file.write_all_at(&data, 0).unwrap();
            let mut asked = Vec::new();
            let mut known = |first: u64, hashes: &mut [u8], flags: &mut [bool]| {
                asked.push((first, flags.len()));
                assert_eq!(hashes.len(), flags.len() * 32);
                for (i, (h, f)) in hashes.chunks_mut(32).zip(flags.iter_mut()).enumerate() {
                    let b = first + i as u64;
                    if b % 3 == 0 {
                        h.copy_from_slice(&truth[b as usize]);
                        if Some(b) == wrong {
                            h[0] ^= 1;
                        }
                        *f = true;
                    }
                }
                Ok(())
            };
            let got = write_tree_beside(&file, &data[..], blocks as u64, &salt, None, Some(&mut known)).unwrap();
            let batches: Vec<(u64, usize)> =
                (0..blocks as u64).step_by(BATCH_BLOCKS).map(|b| (b, 4.min(blocks - b as usize))).collect();
            assert_eq!(asked, batches, "asked once per batch, with its first block and length");
            let mut tail = vec![0u8; clean.len()];
            file.read_exact_at(&mut tail, (blocks as u64 + 1) * 4096).unwrap();
            match wrong {
                None => assert!(got == root && tail == clean, "the same tree from the hashes given"),
                Some(_) => assert_ne!(got, root, "a wrong hash given is used, and changes the root"),
            }
        }
        // Hashes given for blocks not flagged are not used.
        let file = tempfile::tempfile().unwrap();
        let mut noise_only = |_: u64, hashes: &mut [u8], _: &mut [bool]| {
            hashes.fill(0xee);
            Ok(())
        };
        assert_eq!(
            write_tree_beside(&file, &data[..], blocks as u64, &salt, None, Some(&mut noise_only)).unwrap(),
            root
        );
        // An error from it is the tree's error.
        let mut failing = |_: u64, _: &mut [u8], _: &mut [bool]| Err(io::Error::other("old tree unreadable"));
        let e = write_tree_beside(&file, &data[..], blocks as u64, &salt, None, Some(&mut failing)).unwrap_err();
        assert!(e.to_string().contains("old tree unreadable"));
    }

    #[test]
    fn superblock_fields_are_where_veritysetup_reads_them() {
        let salt = Sha256Digest([0x11; 32]);
        let sb = superblock(300, &salt);
        assert_eq!(&sb[..8], b"verity\0\0");
        assert_eq!(sb[8..16], [1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&sb[32..38], b"sha256");
        assert_eq!(sb[64..80], [0, 16, 0, 0, 0, 16, 0, 0, 44, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(sb[80..82], [32, 0]);
        assert_eq!(&sb[88..120], &[0x11; 32]);
        assert!(sb[120..].iter().all(|&b| b == 0));
        let u = uuid_of(&salt);
        assert_eq!((u[6] >> 4, u[8] >> 6), (4, 2));
        assert_ne!(uuid_of(&Sha256Digest([0x12; 32])), u);
    }

    #[test]
    fn uuid_is_the_salts_digest_with_version_4_and_variant_bits() {
        // sha256("imgdeploy dm-verity uuid v1\0" || [7; 32]), first 16 bytes,
        // with the version nibble 4 and the variant bits 10 (by Python's hashlib).
        let want = "da87bd98507646c987c765459f4e2d20";
        let got: String = uuid_of(&Sha256Digest([7; 32])).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
        for seed in 0..64u8 {
            let u = uuid_of(&Sha256Digest([seed; 32]));
            assert_eq!(u[6] >> 4, 4, "version");
            assert_eq!(u[8] >> 6, 0b10, "variant");
        }
    }

    #[test]
    fn validate_accepts_only_our_layout_of_the_signed_size() {
        let good = good_verity();
        let size = 305 * 4096;
        good.validate(size).unwrap();
        assert_eq!(good.validate(size + 4096).unwrap_err().field, "image.verity.hash_offset");
        assert_eq!(good.validate(size - 1).unwrap_err().field, "image.verity.hash_offset");
        let with = |f: &dyn Fn(&mut Verity)| {
            let mut v = good.clone();
            f(&mut v);
            v.validate(size).unwrap_err().field
        };
        assert_eq!(with(&|v| v.hash = "sha1".into()), "image.verity.hash");
        assert_eq!(with(&|v| v.data_block_size = 512), "image.verity.data_block_size");
        assert_eq!(with(&|v| v.hash_block_size = 8192), "image.verity.hash_block_size");
        assert_eq!(with(&|v| v.hash_offset = 0), "image.verity.hash_offset");
        assert_eq!(with(&|v| v.hash_offset = 300 * 4096 + 512), "image.verity.hash_offset");
        assert_eq!(good.data_blocks(), 300);
        assert_eq!(good.hash_start_block(), 301);
        assert_eq!(
            good.table_params("7:3"),
            format!("1 7:3 7:3 4096 4096 300 301 sha256 {} {}", good.root_hash, good.salt)
        );
    }

    #[test]
    fn append_tree_refuses_a_partial_block_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![1u8; 5000]).unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert_eq!(append_tree(&mut f).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 5000);
        let data = noise(129);
        std::fs::write(&p, &data).unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let v = append_tree(&mut f).unwrap();
        let all = std::fs::read(&p).unwrap();
        v.validate(all.len() as u64).unwrap();
        assert_eq!(&all[..data.len()], &data[..]);
        assert_eq!(v.salt, image_salt());
        assert_eq!(v.root_hash, naive_root(&data, &v.salt));
        assert_eq!(&all[data.len()..data.len() + 512], &superblock(129, &v.salt));
    }
}
