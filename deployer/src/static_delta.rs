//! The deployer's side of static deltas ([`imgdeploy_common::sdelta`]):
//! when the manifest lists a delta from an image a slot holds, fetch it,
//! check it against its signed sha256, and apply it to that image into
//! the standby slot's partial file.
//!
//! What the delta wrote is then treated like the partial of an interrupted
//! chunk delta ([`crate::delta::build`]): every chunk is checked in place
//! against the signed chunk index, and a chunk that is not right (a block
//! that did not reproduce with this host's zstd, a damaged block of the
//! old image) is copied from a local image or fetched by Range. So a delta
//! can only save bytes, never decide what the image holds, and the whole
//! image's sha256 stays the final check.

use std::fs::{File, OpenOptions};
use std::io;
use std::time::{Duration, Instant};

use imgdeploy_common::digest::{ResumableSha256, Sha256Digest, StreamHasher};
use imgdeploy_common::location::{FetchError, Location};
use imgdeploy_common::manifest::{DeltaRef, Manifest};
use imgdeploy_common::sdelta::{self, ApplyStats, DeltaReader};
use imgdeploy_common::transport::Transport;
use imgdeploy_common::verity::Verity;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::delta::Budget;
use crate::fetch::{PartialMeta, Streamed};
use crate::state::{Layout, SlotId};

/// Why a static delta was not used (the caller goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum StaticDeltaError {
    /// Fetching it failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// It is not the file the manifest signs.
    #[error("static delta {url} {what}; it was truncated or tampered with")]
    Digest {
        /// Where.
        url: String,
        /// What is wrong.
        what: String,
    },
    /// It does not parse, or describes other images.
    #[error("static delta {url} is unusable")]
    Invalid {
        /// Where.
        url: String,
        /// Why.
        #[source]
        err: sdelta::DeltaFileError,
    },
    /// It was made for other images than the manifest says.
    #[error("static delta {url} {what}, the manifest says {want}")]
    WrongImages {
        /// Where.
        url: String,
        /// What its header says.
        what: String,
        /// What the manifest says.
        want: String,
    },
    /// The time for the whole transfer ran out.
    #[error("the static delta from {url} did not arrive within download_timeout")]
    Timeout {
        /// Where.
        url: String,
    },
    /// Local I/O.
    #[error("cannot write {path}; free space in state_dir and rerun")]
    Disk {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The manifest's delta whose `from` image one of `held` (slot, image
/// sha256) holds, preferring the first slot listed. None when a slot holds
/// the manifest's image itself: that is a repair, where the chunk delta
/// fetches only the damaged chunks and a delta would carry every change
/// since its `from`.
pub fn pick<'m>(m: &'m Manifest, held: &[(SlotId, Sha256Digest)]) -> Option<(SlotId, &'m DeltaRef)> {
    if held.iter().any(|(_, sha)| *sha == m.image.sha256) {
        return None;
    }
    held.iter().find_map(|(slot, sha)| m.deltas.iter().find(|d| d.from == *sha).map(|d| (*slot, d)))
}

/// What [`fetch_and_apply`] did.
#[derive(Debug, Default, serde::Serialize)]
pub struct StaticStats {
    /// Bytes of the delta file fetched in this run (0 when an earlier run's
    /// verified copy was reused).
    pub fetched: u64,
    /// The delta file's size.
    pub delta_size: u64,
    /// What applying it did.
    #[serde(flatten)]
    pub applied: ApplyStats,
    /// The partial file it was applied into.
    #[serde(skip)]
    pub out: Option<File>,
    /// The hashes of the blocks it copied, in the old image's tree, when
    /// that tree has the new one's salt.
    #[serde(skip)]
    pub old_leaves: Option<OldLeaves>,
}

/// The dm-verity hashes of the blocks a static delta copied whole from the
/// old image, read from the old image's own tree instead of computed: with
/// the same salt, the same block has the same hash. When one was read
/// wrong (a damaged old tree) the root differs from the signed one and the
/// image is checked chunk by chunk; the whole image's sha256, over every
/// byte, is checked either way.
#[derive(Debug)]
pub struct OldLeaves {
    old: File,
    /// Where the old tree's bottom level starts.
    at: u64,
    /// The old image's data blocks.
    blocks: u64,
    /// The delta's copies, in output order: (new offset, old offset, length).
    copies: Vec<(u64, u64, u64)>,
}

impl OldLeaves {
    /// For `old_tree`, the tree of the image in `old`, if its salt is `new`'s.
    fn new(old: &File, old_tree: &Verity, new: &Verity, copies: Vec<(u64, u64, u64)>) -> io::Result<Option<Self>> {
        let Some(at) = old_tree.leaves_offset().filter(|_| old_tree.salt == new.salt) else { return Ok(None) };
        Ok(Some(OldLeaves { old: old.try_clone()?, at, blocks: old_tree.data_blocks(), copies }))
    }

    /// Fills in the hashes of the blocks from `first` on (one per flag)
    /// that lie whole in a copy whose old offset is on the same block
    /// boundary ([`imgdeploy_common::verity::Known`]).
    pub fn fill(&self, first: u64, hashes: &mut [u8], known: &mut [bool]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const BLOCK: u64 = imgdeploy_common::verity::BLOCK_SIZE;
        let end = first + known.len() as u64;
        let from = self.copies.partition_point(|&(at, _, len)| at + len <= first * BLOCK);
        for &(at, old, len) in &self.copies[from..] {
            if at >= end * BLOCK {
                break;
            }
            if at % BLOCK != old % BLOCK {
                continue;
            }
            // The blocks of this batch wholly inside the copy and inside the
            // old data (the old tree has no hash of its own tail).
            let a = first.max(at.div_ceil(BLOCK));
            let old_a = (old + a * BLOCK).saturating_sub(at) / BLOCK;
            let b = end.min((at + len) / BLOCK).min((a + self.blocks).saturating_sub(old_a));
            if a >= b {
                continue;
            }
            let (i, j) = ((a - first) as usize, (b - first) as usize);
            self.old.read_exact_at(&mut hashes[i * 32..j * 32], self.at + old_a * 32)?;
            known[i..j].fill(true);
        }
        Ok(())
    }
}

/// Fetches the delta `d` (relative to the manifest at `base`) into the
/// standby's state, or reuses a verified copy from an interrupted run;
/// returns the open, verified file.
fn fetch_delta(
    t: &Transport,
    budget: Budget,
    base: &Location,
    d: &DeltaRef,
    layout: &Layout,
    standby: SlotId,
) -> Result<(File, u64), StaticDeltaError> {
    let loc = base.sibling(&d.path);
    let url = loc.to_string();
    let path = layout.static_delta(standby);
    let disk = |source| StaticDeltaError::Disk { path: path.display().to_string(), source };
    if let Ok(f) = File::open(&path) {
        if Sha256Digest::of_reader(io::BufReader::new(&f)).is_ok_and(|found| found == (d.sha256, d.size)) {
            return Ok((File::open(&path).map_err(disk)?, 0));
        }
    }
    let left = budget.left().ok_or_else(|| StaticDeltaError::Timeout { url: url.clone() })?;
    let t = t.with_timeouts(Duration::from_secs(60).min(left), left);
    let (reader, _) = loc.open(&t, 0)?;
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(disk)?;
    let mut hasher = StreamHasher::new();
    match crate::fetch::stream_hashed(reader, &mut file, &mut hasher, d.size, |_| ()) {
        Ok(_) => {}
        Err(Streamed::Read(e)) if budget.left().is_none() => {
            tracing::debug!("{e}");
            return Err(StaticDeltaError::Timeout { url });
        }
        Err(Streamed::Read(e)) => return Err(loc.read_error(e).into()),
        Err(Streamed::Write(e)) => return Err(disk(e)),
        Err(Streamed::TooLong) => {
            let _ = std::fs::remove_file(&path);
            return Err(StaticDeltaError::Digest {
                url,
                what: format!("is longer than the {} bytes the manifest signs", d.size),
            });
        }
    }
    let (found, len) = hasher.finish();
    if (found, len) != (d.sha256, d.size) {
        let _ = std::fs::remove_file(&path);
        return Err(StaticDeltaError::Digest {
            url,
            what: format!("is {len} bytes with sha256 {found}, the manifest signs {} bytes with {}", d.size, d.sha256),
        });
    }
    // Not flushed: the file is a cache, whose sha256 a later run checks
    // before it reuses it (a 15 MB delta took 15 ms to flush here).
    io::Seek::rewind(&mut file).map_err(disk)?;
    Ok((file, len))
}

fn progress(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} static delta [{bar:30}] {bytes}/{total_bytes} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// Fetches the static delta `d`, checks it, and applies it to the image in
/// slot `from` into `standby`'s partial file, which it marks as a chunk
/// delta's partial of the manifest's image: [`crate::delta::build`] then
/// checks every chunk of it in place and fetches what is not right.
#[allow(clippy::too_many_arguments)]
pub fn fetch_and_apply(
    t: &Transport,
    budget: Budget,
    base: &Location,
    m: &Manifest,
    d: &DeltaRef,
    (from, old_tree): (SlotId, Option<&Verity>),
    layout: &Layout,
    standby: SlotId,
) -> Result<StaticStats, StaticDeltaError> {
    let started = Instant::now();
    let url = base.sibling(&d.path).to_string();
    let (file, fetched) = fetch_delta(t, budget, base, d, layout, standby)?;
    let mut reader = DeltaReader::new(io::BufReader::with_capacity(1 << 20, file))
        .map_err(|err| StaticDeltaError::Invalid { url: url.clone(), err })?;
    let h = *reader.header();
    if (h.from, h.to) != (d.from, m.image.sha256) || h.out_size != m.image.data_size() {
        return Err(StaticDeltaError::WrongImages {
            url,
            what: format!("turns {} into {} ({} bytes)", h.from, h.to, h.out_size),
            want: format!("{} into {} ({} bytes)", d.from, m.image.sha256, m.image.data_size()),
        });
    }
    let partial = layout.partial(standby);
    let disk = |source| StaticDeltaError::Disk { path: partial.display().to_string(), source };
    let old = File::open(layout.image(from))
        .map_err(|source| StaticDeltaError::Disk { path: layout.image(from).display().to_string(), source })?;
    // Filled out of order: a full download must never resume it as a prefix.
    PartialMeta { sha256: m.image.sha256, size: m.image.size, delta: true }.save(layout, standby).map_err(disk)?;
    let out = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&partial).map_err(disk)?;
    out.set_len(m.image.size).map_err(disk)?;
    let pb = progress(h.out_size);
    let shown = |s: &ApplyStats| {
        pb.set_position(s.copied + s.patched + s.literal + s.unreproduced_bytes);
        pb.set_message(format!(
            "copied {}, patched {}, from the delta {}, left to fetch {}",
            HumanBytes(s.copied),
            HumanBytes(s.patched),
            HumanBytes(s.literal),
            HumanBytes(s.unreproduced_bytes)
        ));
    };
    let mut applied = sdelta::apply(&mut reader, &old, &out, &shown).map_err(|e| match e {
        sdelta::ApplyError::File(err) => StaticDeltaError::Invalid { url: url.clone(), err },
        sdelta::ApplyError::Write(source) => disk(source),
    })?;
    pb.finish_and_clear();
    tracing::info!(
        "static delta: {} fetched, {} copied, {} patched, {} literal, {} did not reproduce, in {} ms",
        HumanBytes(fetched),
        HumanBytes(applied.copied),
        HumanBytes(applied.patched),
        HumanBytes(applied.literal),
        HumanBytes(applied.unreproduced_bytes),
        started.elapsed().as_millis()
    );
    // Only for a check of the whole image (every region reproduced).
    let mut old_leaves = None;
    if let (Some(old_tree), Some(new), 0) = (old_tree, &m.image.verity, applied.unreproduced_bytes) {
        old_leaves = OldLeaves::new(&old, old_tree, new, std::mem::take(&mut applied.copies)).map_err(disk)?;
    }
    Ok(StaticStats { fetched, delta_size: d.size, applied, out: Some(out), old_leaves })
}

/// Completes an image whose data a static delta reproduced in full: one
/// read of the data feeds both the dm-verity tree (whose root must be the
/// signed one) and the whole-image sha256 (which must be the signed one,
/// tree included); then the file is made durable. The pieces between the
/// manifest's SHA-256 checkpoints are checked on every core
/// ([`crate::parallel_check`]); an image without them on two (the tree on
/// one, the sha256 on the other). The tree takes the hashes of the blocks
/// copied from the old image from its tree (`old`), so only the rest is
/// hashed twice.
/// `Ok(false)` when either differs: the caller checks it chunk by chunk.
pub fn finish(out: &File, m: &Manifest, old: Option<OldLeaves>) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let Some(v) = &m.image.verity else { return Ok(false) };
    // The data the delta wrote goes to disk while it is hashed (on this
    // machine a 425 MB image took 0.2 s to flush after the hashing).
    let data = out.try_clone()?;
    let flushing = std::thread::spawn(move || data.sync_data());
    let fill = old.as_ref().map(|o| move |first: u64, h: &mut [u8], k: &mut [bool]| o.fill(first, h, k));
    let known = fill.as_ref().map(|f| f as crate::parallel_check::KnownLeaves<'_>);
    let checked = match crate::parallel_check::check_data(out, v, &m.image.checkpoints, known) {
        Ok(Some(true)) => {
            let root = imgdeploy_common::verity::write_levels_above(out, v.data_blocks(), &v.salt);
            let resumed = m.image.checkpoints.last().and_then(ResumableSha256::resume);
            root.map(|root| Some((if root == v.root_hash { Ok(()) } else { Err(root) }, resumed.expect("checked"))))
        }
        Ok(Some(false)) => {
            tracing::warn!("the static delta's data does not have the SHA-256 checkpoints the manifest signs");
            Ok(None)
        }
        Ok(None) => {
            // No checkpoints: the tree and the sha256 side by side.
            let mut whole = ResumableSha256::new();
            let mut by_ref = fill.as_ref();
            let known = by_ref.as_mut().map(|f| f as imgdeploy_common::verity::Known<'_>);
            let data = crate::delta::data_reader(out, v);
            data.and_then(|d| crate::delta::tree_from(out, d, v, Some(&mut |b| whole.update(b)), known))
                .map(|tree| Some((tree, whole)))
        }
        Err(e) => Err(e),
    };
    let flushed = flushing.join().expect("fsync does not panic");
    let Some((tree, mut whole)) = checked? else { return Ok(false) };
    if let Err(root) = tree {
        tracing::warn!("the static delta's data has dm-verity root {root}, the manifest signs {}", v.root_hash);
        return Ok(false);
    }
    flushed?;
    // The tail (superblock and tree, about 1% of the image) in pieces.
    let mut piece = vec![0u8; 1 << 20];
    for at in (v.hash_offset..m.image.size).step_by(piece.len()) {
        let n = (m.image.size - at).min(piece.len() as u64) as usize;
        out.read_exact_at(&mut piece[..n], at)?;
        whole.update(&piece[..n]);
    }
    let (found, len) = whole.finish();
    if (found, len) != (m.image.sha256, m.image.size) {
        tracing::warn!("the image made by the static delta has sha256 {found}, the manifest signs {}", m.image.sha256);
        return Ok(false);
    }
    out.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgdeploy_common::manifest::{image_path, BlockMapRef, ImageFormat, ImageRef, Timestamp, FORMAT_VERSION};

    /// An image of `blocks` distinct data blocks with its tree, as the
    /// builder appends it: the file and its `Verity`.
    fn image(dir: &std::path::Path, name: &str, data: &[u8]) -> (File, Verity) {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let v = imgdeploy_common::verity::append_tree(&mut f).unwrap();
        (f, v)
    }

    fn blocks(n: usize, seed: u8) -> Vec<u8> {
        (0..n * 4096).map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ seed).collect()
    }

    #[test]
    fn old_leaves_give_the_hash_of_every_block_copied_whole_and_on_the_same_boundary() {
        use std::os::unix::fs::FileExt;
        const B: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let old_data = blocks(40, 1);
        let (old, old_v) = image(dir.path(), "old", &old_data);
        // The new image: its copies from the old one, and new bytes elsewhere.
        let copies = vec![
            (0, 10 * B, 3 * B),                 // blocks 0-2 <- old 10-12
            (3 * B, 20 * B + 7, 2 * B),         // another boundary: none
            (5 * B + 100, 30 * B + 100, 3 * B), // blocks 6 and 7 whole <- old 31, 32
            (9 * B, 38 * B, 4 * B),             // past the old data after old block 39: block 9, 10
            (13 * B, 0, 11 * B),                // blocks 13-23 <- old 0-10, across batches
        ];
        let mut new_data = blocks(24, 2);
        for &(at, from, len) in &copies {
            let (at, from) = (at as usize, from as usize);
            let end = (from + len as usize).min(old_data.len());
            new_data[at..at + end - from].copy_from_slice(&old_data[from..end]);
        }
        let (new, new_v) = image(dir.path(), "new", &new_data);
        let leaves = OldLeaves::new(&old, &old_v, &new_v, copies.clone()).unwrap().expect("the same salt");
        let mut truth = vec![0u8; 24 * 32];
        new.read_exact_at(&mut truth, new_v.leaves_offset().unwrap()).unwrap();
        let mut known_blocks = Vec::new();
        for first in (0..24).step_by(5) {
            let n = 5.min(24 - first as usize);
            let (mut hashes, mut known) = (vec![0u8; n * 32], vec![false; n]);
            leaves.fill(first, &mut hashes, &mut known).unwrap();
            for (i, k) in known.iter().enumerate() {
                let b = first as usize + i;
                if *k {
                    known_blocks.push(b);
                    assert_eq!(hashes[i * 32..i * 32 + 32], truth[b * 32..b * 32 + 32], "block {b}");
                }
            }
        }
        let want: Vec<usize> = [0, 1, 2, 6, 7, 9, 10].into_iter().chain(13..24).collect();
        assert_eq!(known_blocks, want);
        // Another salt: nothing to take.
        let other = Verity { salt: Sha256Digest([9; 32]), ..new_v.clone() };
        assert!(OldLeaves::new(&old, &old_v, &other, copies).unwrap().is_none());
    }

    fn delta_from(from: u8) -> DeltaRef {
        let map = BlockMapRef { path: "maps/x.map".into(), sha256: Sha256Digest([0; 32]), size: 1 };
        let sha256 = Sha256Digest([from; 32]);
        DeltaRef { from: sha256, from_map: map, path: format!("deltas/{from}.delta"), sha256, size: 10 }
    }

    #[test]
    fn the_delta_taken_starts_from_a_held_image_the_first_slot_first_and_never_in_a_repair() {
        let sha256 = Sha256Digest([9; 32]);
        let m = Manifest {
            format: FORMAT_VERSION,
            channel: "stable".into(),
            serial: 3,
            version: "v3".into(),
            created: Timestamp(1_700_000_000),
            expires: Timestamp(1_700_000_000 + 86400),
            image: ImageRef {
                path: image_path(&sha256),
                sha256,
                size: 100,
                format: ImageFormat::Squashfs,
                compression: "zstd".into(),
                verity: None,
                checkpoints: Vec::new(),
            },
            index: None,
            rollout: None,
            block_map: None,
            deltas: vec![delta_from(1), delta_from(2)],
        };
        let (a, b) = (SlotId::A, SlotId::B);
        let taken = |held: &[(SlotId, Sha256Digest)]| pick(&m, held).map(|(slot, d)| (slot, d.from.0[0]));
        assert_eq!(taken(&[(a, Sha256Digest([2; 32])), (b, Sha256Digest([1; 32]))]), Some((a, 2)));
        assert_eq!(taken(&[(b, Sha256Digest([1; 32])), (a, Sha256Digest([2; 32]))]), Some((b, 1)));
        assert_eq!(taken(&[(a, Sha256Digest([7; 32])), (b, Sha256Digest([1; 32]))]), Some((b, 1)));
        assert_eq!(taken(&[(a, Sha256Digest([7; 32]))]), None, "no delta from the held image");
        assert_eq!(taken(&[]), None);
        // A slot holds the manifest's image: a repair, by the chunk delta.
        assert_eq!(taken(&[(a, Sha256Digest([1; 32])), (b, sha256)]), None);
        assert_eq!(taken(&[(a, sha256), (b, Sha256Digest([2; 32]))]), None);
    }
}
