//! Delta updates: build the new image in the standby slot from chunks this
//! host already has, fetching only the missing ones with HTTP Range requests
//! on the one published image file.
//!
//! The signed manifest names the new image's chunk index by sha256 and size;
//! the index is fetched with that bound, verified and parsed. Every slot that
//! holds an image and its index is a *seed*. Seeds are never trusted: a chunk
//! is copied only after its bytes hash to the value the new index signs. A
//! partial file of the same image left by an interrupted run is checked in
//! place first, so a rerun resumes. Missing chunks are fetched in coalesced
//! ranges, several ranges per request (`multipart/byteranges`); each chunk
//! from the server is verified too, and the whole image is hashed at the end.
//!
//! The dm-verity superblock and hash tree at the end of the image are a
//! function of the data before them and the signed salt, and a change that
//! shifts the data renews most of the tree (1/128 of the image). So chunks
//! of the tree that no local image holds are computed here, not fetched,
//! checked against the signed root hash and each chunk's signed hash (a
//! chunk that does not reproduce is fetched after all).
//!
//! Any failure here is reported to the caller, which falls back to a full
//! download; a server that ignores Range is detected on the first request.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use imgdeploy_common::chunk::{Chunk, ChunkHash, ChunkIndex, ChunkParams, IndexError};
use imgdeploy_common::digest::{Sha256Digest, StreamHasher};
use imgdeploy_common::location::{FetchError, Location};
use imgdeploy_common::manifest::{IndexRef, Manifest};
use imgdeploy_common::transport::Transport;
use imgdeploy_common::verity::{self, Verity};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::fetch::PartialMeta;
use crate::state::{Layout, SlotId};

/// Ranges per request; keeps the Range header well under 4 KiB.
const RANGES_PER_REQUEST: usize = 32;

/// Why a delta could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// Fetching failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The index did not match its signed digest or size.
    #[error("chunk index {url} {what}; it was truncated or tampered with")]
    IndexDigest {
        /// Where.
        url: String,
        /// What is wrong.
        what: String,
    },
    /// The index does not parse or does not describe this image.
    #[error("chunk index {url} is invalid")]
    Index {
        /// Where.
        url: String,
        /// Why.
        #[source]
        err: IndexError,
    },
    /// The delta as a whole took longer than `download_timeout`.
    #[error(
        "the delta from {url} did not finish within download_timeout ({}); rerun, or raise download_timeout if the link is this slow",
        humantime::format_duration(*limit)
    )]
    Timeout {
        /// Where.
        url: String,
        /// The budget for all of the delta's requests together.
        limit: std::time::Duration,
    },
    /// The parts of the server's answer do not match the chunks asked for.
    #[error("{url} answered a Range request badly: {what}")]
    BadRange {
        /// Where.
        url: String,
        /// What.
        what: String,
    },
    /// A chunk from the server does not match the signed index.
    #[error(
        "chunk at offset {offset} from {url} does not match the signed index; the published image was tampered with"
    )]
    Chunk {
        /// Where.
        url: String,
        /// The chunk's offset.
        offset: u64,
    },
    /// The assembled image does not hash to the signed value.
    #[error("the image assembled from chunks has sha256 {found}, the manifest signs {expected}")]
    Digest {
        /// Signed.
        expected: Sha256Digest,
        /// Computed.
        found: Sha256Digest,
    },
    /// The hash tree computed from the assembled data has another root.
    #[error("the data assembled from chunks has dm-verity root hash {found}, the manifest signs {expected}")]
    RootHash {
        /// Signed.
        expected: Sha256Digest,
        /// Computed.
        found: Sha256Digest,
    },
    /// Local I/O.
    #[error("cannot write the delta image {path}; free space in state_dir and rerun")]
    Disk {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A verified chunk index and its published bytes.
#[derive(Debug, Clone)]
pub struct FetchedIndex {
    /// The parsed index.
    pub index: ChunkIndex,
    /// The compressed bytes, as signed.
    pub bytes: Vec<u8>,
}

/// Fetches the index `r` names (relative to the manifest at `base`) and checks
/// it against its signed size and sha256 and against the manifest's image.
pub fn fetch_index(t: &Transport, base: &Location, r: &IndexRef, m: &Manifest) -> Result<FetchedIndex, DeltaError> {
    let loc = base.sibling(&r.path);
    let url = loc.to_string();
    let bytes = loc.read_bounded(t, r.size)?;
    if bytes.len() as u64 != r.size {
        return Err(DeltaError::IndexDigest {
            url,
            what: format!("is {} bytes, the manifest signs {}", bytes.len(), r.size),
        });
    }
    let sha = Sha256Digest::of_bytes(&bytes);
    if sha != r.sha256 {
        return Err(DeltaError::IndexDigest {
            url,
            what: format!("has sha256 {sha}, the manifest signs {}", r.sha256),
        });
    }
    let index = ChunkIndex::decode(&bytes).map_err(|err| DeltaError::Index { url: url.clone(), err })?;
    if index.image_size != m.image.size {
        return Err(DeltaError::Index {
            url,
            err: IndexError::Invalid(format!("describes {} bytes, the image has {}", index.image_size, m.image.size)),
        });
    }
    Ok(FetchedIndex { index, bytes })
}

/// A local file with an index describing (we hope) its contents.
pub struct Seed {
    /// For messages.
    pub name: String,
    file: File,
    index: ChunkIndex,
}

/// Every slot image, with its stored index. A slot whose image arrived by a
/// static delta has none (it was never fetched). If it holds the very image
/// `new` (of sha256 `new_sha256`) describes (a repair), that index is its
/// own: a damaged chunk is then the only one that fails. Otherwise its
/// index is computed here from the image with `new`'s parameters, and
/// stored unless `dry_run`. Seeds are never trusted: every chunk copied
/// from one is checked against `new`.
pub fn local_seeds(layout: &Layout, new: &ChunkIndex, new_sha256: &Sha256Digest, dry_run: bool) -> Vec<Seed> {
    let mut seeds = Vec::new();
    for slot in SlotId::ALL {
        let Ok(file) = File::open(layout.image(slot)) else { continue };
        let stored = match std::fs::read(layout.index(slot)) {
            Ok(bytes) => Some(ChunkIndex::decode(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(IndexError::Invalid(e.to_string()))),
        };
        let index = match stored {
            Some(Ok(index)) => index,
            Some(Err(e)) => {
                tracing::warn!("slot {slot}: stored chunk index unusable ({e}); not used for deltas");
                continue;
            }
            None if holds(layout, slot, new_sha256) => new.clone(),
            None => match compute_index(layout, slot, &file, new.params, dry_run) {
                Ok(index) => index,
                Err(e) => {
                    tracing::warn!("slot {slot}: cannot compute its chunk index ({e}); not used for deltas");
                    continue;
                }
            },
        };
        seeds.push(Seed { name: format!("slot {slot}"), file, index });
    }
    seeds
}

/// Whether `slot`'s recorded manifest names the image of sha256 `sha256`.
fn holds(layout: &Layout, slot: SlotId, sha256: &Sha256Digest) -> bool {
    std::fs::read(layout.manifest(slot))
        .ok()
        .and_then(|b| imgdeploy_common::manifest::Manifest::parse(&b).ok())
        .is_some_and(|m| m.image.sha256 == *sha256)
}

fn compute_index(
    layout: &Layout,
    slot: SlotId,
    file: &File,
    params: ChunkParams,
    dry_run: bool,
) -> io::Result<ChunkIndex> {
    tracing::info!("slot {slot}: computing its chunk index (its image came by a static delta)");
    let (index, _, _) = ChunkIndex::build(io::BufReader::with_capacity(1 << 20, file.try_clone()?), params)?;
    if !dry_run {
        imgdeploy_common::atomic::write_atomic(&layout.index(slot), &index.encode(), 0o600)?;
    }
    Ok(index)
}

/// What a delta did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DeltaStats {
    /// Bytes copied from local images.
    pub reused: u64,
    /// Bytes already in place from an interrupted run.
    pub resumed: u64,
    /// Bytes fetched from the server.
    pub downloaded: u64,
    /// Bytes of the dm-verity superblock and hash tree computed here
    /// instead of fetched.
    pub computed: u64,
    /// HTTP requests made (or needed) for chunks.
    pub requests: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunks fetched.
    pub chunks_fetched: u64,
}

fn read_chunk(f: &File, offset: u64, len: u32, buf: &mut Vec<u8>) -> io::Result<ChunkHash> {
    buf.resize(len as usize, 0);
    f.read_exact_at(buf, offset)?;
    Ok(ChunkHash::of(buf))
}

/// Ranges of consecutive missing chunks, as (first chunk, last chunk) indexes.
fn coalesce(missing: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in missing {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == i => *last = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// Where a chunk of the new image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Already in the partial file from an interrupted run (verified).
    InPlace,
    /// Probably in a local image (verified when copied).
    Local,
    /// From the server.
    Fetch,
    /// Part of the hash tree: computed from the data before it.
    Computed,
}

/// Chunk hash -> where local images (claim to) hold it.
type Lookup = HashMap<ChunkHash, Vec<(usize, u64, u32)>>;

fn lookup(seeds: &[Seed]) -> Lookup {
    let mut have: Lookup = HashMap::new();
    for (si, s) in seeds.iter().enumerate() {
        for c in &s.index.chunks {
            have.entry(c.hash).or_default().push((si, c.offset, c.len));
        }
    }
    have
}

/// Decides each chunk's source. Only a resumed partial is read here; seeds
/// are read (and verified) when their chunks are copied.
fn plan(
    new: &ChunkIndex,
    have: &Lookup,
    resume: Option<(&File, &dyn Fn(io::Error) -> DeltaError)>,
) -> Result<Vec<Source>, DeltaError> {
    let mut buf = Vec::new();
    new.chunks
        .iter()
        .map(|c| {
            if let Some((f, disk)) = resume {
                if read_chunk(f, c.offset, c.len, &mut buf).map_err(disk)? == c.hash {
                    return Ok(Source::InPlace);
                }
            }
            Ok(if have.get(&c.hash).is_some_and(|v| v.iter().any(|&(_, _, len)| len == c.len)) {
                Source::Local
            } else {
                Source::Fetch
            })
        })
        .collect()
}

/// Marks the chunks that lie wholly in the hash tree and would be fetched
/// as computed instead. The chunk that straddles the tree's start is
/// marked too when `straddling` (the partial file already holds the data,
/// from a static delta or an interrupted run; if its data part turns out
/// wrong, it is fetched after all). Returns the bytes marked.
fn compute_tree(sources: &mut [Source], new: &ChunkIndex, verity: Option<&Verity>, straddling: bool) -> u64 {
    let Some(v) = verity else { return 0 };
    let mut bytes = 0;
    for (source, c) in sources.iter_mut().zip(&new.chunks) {
        let in_tree = c.offset >= v.hash_offset || (straddling && c.offset + c.len as u64 > v.hash_offset);
        if in_tree && *source == Source::Fetch {
            *source = Source::Computed;
            bytes += c.len as u64;
        }
    }
    bytes
}

/// Writes the superblock and hash tree of `v` after the data already in
/// `out`, once the tree it yields has the signed root hash.
fn write_tree(out: &File, v: &Verity, disk: impl Fn(io::Error) -> DeltaError) -> Result<(), DeltaError> {
    match tree_from(out, data_reader(out, v).map_err(&disk)?, v, None, None).map_err(disk)? {
        Ok(()) => Ok(()),
        Err(found) => Err(DeltaError::RootHash { expected: v.root_hash, found }),
    }
}

/// A reader of the image's data: the first `v.hash_offset` bytes of `out`,
/// what the page cache holds from there and the rest straight from the
/// disk ([`crate::readback`]). Unbuffered: the tree reads it in 8 MiB
/// batches.
pub fn data_reader(out: &File, v: &Verity) -> io::Result<impl Read> {
    crate::readback::ReadBack::new(out, v.hash_offset)
}

/// Hashes the image's data, read from `data`, into the dm-verity tree of
/// `v`, written after the data in `out` with its superblock, and checks its
/// root against the signed one. `Ok(Err(root))`: the data has another root,
/// so the tail written is wrong too (the image's signed sha256 refuses it
/// unless a later pass writes it again).
/// `beside` sees the data as it is read, and `known` gives the hashes of
/// blocks that need not be hashed ([`verity::write_tree_beside`]).
pub fn tree_from(
    out: &File,
    data: impl Read,
    v: &Verity,
    beside: Option<verity::Beside<'_>>,
    known: Option<verity::Known<'_>>,
) -> io::Result<Result<(), Sha256Digest>> {
    let root = verity::write_tree_beside(out, data, v.data_blocks(), &v.salt, beside, known)?;
    Ok(if root == v.root_hash { Ok(()) } else { Err(root) })
}

/// Time left for the whole delta, which `download_timeout` bounds as one
/// transfer (however many requests it takes).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// When it runs out.
    pub deadline: Instant,
    /// Its length, for messages.
    pub limit: Duration,
}

impl Budget {
    /// A budget of `limit` starting now.
    pub fn starting_now(limit: Duration) -> Self {
        Budget { deadline: Instant::now() + limit, limit }
    }

    /// What is left of it, if anything.
    pub fn left(&self) -> Option<Duration> {
        self.deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }
}

/// Fetches `ranges` (chunk index pairs) and writes their verified chunks;
/// fails unless every chunk in `ranges` arrived before the budget ran out.
#[allow(clippy::too_many_arguments)]
fn fetch_ranges(
    t: &Transport,
    budget: Budget,
    image: &Location,
    new: &ChunkIndex,
    ranges: &[(usize, usize)],
    out: &File,
    path: &str,
    stats: &mut DeltaStats,
    pb: &ProgressBar,
) -> Result<(), DeltaError> {
    let url = image.to_string();
    let disk = |source| DeltaError::Disk { path: path.to_owned(), source };
    let bad = |what: String| DeltaError::BadRange { url: url.clone(), what };
    let bytes: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(a, b)| (new.chunks[a].offset, new.chunks[b].offset + new.chunks[b].len as u64 - 1))
        .collect();
    // A transport error after the budget ran out is the budget's doing.
    let in_time = |e: FetchError| match budget.left() {
        None => DeltaError::Timeout { url: url.clone(), limit: budget.limit },
        Some(_) => DeltaError::Fetch(e),
    };
    let left = budget.left().ok_or(DeltaError::Timeout { url: url.clone(), limit: budget.limit })?;
    let mut parts = image.read_ranges(t, &bytes, left).map_err(in_time)?;
    stats.requests += 1;
    // Chunks written by this answer: as many as it carried, not one flag per chunk of the image.
    let mut received = std::collections::HashSet::new();
    let mut buf = Vec::new();
    while let Some((start, end)) = parts.next_part().map_err(in_time)? {
        let mut i = new.chunks.partition_point(|c: &Chunk| c.offset < start);
        if new.chunks.get(i).map(|c| c.offset) != Some(start) {
            return Err(bad(format!("a part starts at {start}, not at a chunk boundary")));
        }
        while i < new.chunks.len() && new.chunks[i].offset <= end {
            let c = new.chunks[i];
            if c.offset + c.len as u64 - 1 > end {
                return Err(bad(format!("a part ends at {end}, inside a chunk")));
            }
            buf.resize(c.len as usize, 0);
            parts.read_exact(&mut buf).map_err(|e| in_time(image.read_error(e)))?;
            if ChunkHash::of(&buf) != c.hash {
                return Err(DeltaError::Chunk { url: url.clone(), offset: c.offset });
            }
            out.write_all_at(&buf, c.offset).map_err(disk)?;
            received.insert(i);
            stats.downloaded += c.len as u64;
            stats.chunks_fetched += 1;
            pb.inc(c.len as u64);
            i += 1;
        }
    }
    // Parts may come in any order, but none may be missing.
    if let Some(i) = ranges.iter().flat_map(|&(a, b)| a..=b).find(|i| !received.contains(i)) {
        return Err(bad(format!(
            "it left out the chunk at offset {} (asked for {} ranges)",
            new.chunks[i].offset,
            ranges.len()
        )));
    }
    Ok(())
}

fn progress(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} delta [{bar:30}] {bytes}/{total_bytes} (reused + downloaded) {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// What [`build`] would fetch for the image of `m` (described by `new`),
/// assuming the local images are intact; sends nothing, writes nothing.
pub fn estimate(m: &Manifest, new: &ChunkIndex, seeds: &[Seed]) -> Result<DeltaStats, DeltaError> {
    let mut sources = plan(new, &lookup(seeds), None)?;
    let computed = compute_tree(&mut sources, new, m.image.verity.as_ref(), false);
    let missing: Vec<usize> = (0..sources.len()).filter(|&i| sources[i] == Source::Fetch).collect();
    let downloaded = missing.iter().map(|&i| new.chunks[i].len as u64).sum();
    Ok(DeltaStats {
        chunks: new.chunks.len() as u64,
        requests: coalesce(&missing).len().div_ceil(RANGES_PER_REQUEST) as u64,
        downloaded,
        chunks_fetched: missing.len() as u64,
        computed,
        reused: m.image.size - downloaded - computed,
        ..Default::default()
    })
}

/// Builds the image of `m` (described by `new`) in `slot`'s partial file from
/// `seeds` and the server, within `budget`, and returns it open: its sha256
/// was computed over exactly the bytes written, so it can be mounted without
/// being read again.
#[allow(clippy::too_many_arguments)]
pub fn build(
    t: &Transport,
    budget: Budget,
    image: &Location,
    m: &Manifest,
    new: &ChunkIndex,
    seeds: &[Seed],
    layout: &Layout,
    slot: SlotId,
) -> Result<(DeltaStats, File), DeltaError> {
    let partial = layout.partial(slot);
    let path = partial.display().to_string();
    let disk = |source| DeltaError::Disk { path: path.clone(), source };
    let mut stats = DeltaStats { chunks: new.chunks.len() as u64, ..Default::default() };
    let have = lookup(seeds);
    // A partial of this very image from an interrupted delta is checked in place.
    let want = PartialMeta { sha256: m.image.sha256, size: m.image.size, delta: true };
    let resuming = std::fs::read(layout.partial_meta(slot))
        .ok()
        .and_then(|b| serde_json::from_slice::<PartialMeta>(&b).ok())
        .as_ref()
        == Some(&want)
        && std::fs::metadata(&partial).is_ok_and(|md| md.len() == m.image.size);
    // Marks the partial as filled out of order, so a full download never resumes it as a prefix.
    want.save(layout, slot).map_err(disk)?;
    let out = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&partial).map_err(disk)?;
    out.set_len(m.image.size).map_err(disk)?;
    let pb = progress(m.image.size);
    let mut sources = plan(new, &have, resuming.then_some((&out, &disk as &dyn Fn(io::Error) -> DeltaError)))?;
    compute_tree(&mut sources, new, m.image.verity.as_ref(), resuming);

    // 1. Fetch what no local image has, in coalesced multi-range requests.
    let missing: Vec<usize> = (0..sources.len()).filter(|&i| sources[i] == Source::Fetch).collect();
    for batch in coalesce(&missing).chunks(RANGES_PER_REQUEST) {
        fetch_ranges(t, budget, image, new, batch, &out, &path, &mut stats, &pb)?;
    }
    // 2. One pass in image order: copy local chunks (verifying each), and
    //    hash the whole image exactly as it is written. The whole-image hash
    //    runs on a second thread so the two hashes share the cores.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let hasher = std::thread::spawn(move || {
        let mut whole = StreamHasher::new();
        for buf in rx {
            whole.update(&buf);
        }
        whole.finish()
    });
    let mut buf = Vec::new();
    let mut tree_written = false;
    let copy_result = (|| -> Result<(), DeltaError> {
        for (i, c) in new.chunks.iter().enumerate() {
            match sources[i] {
                Source::Computed => {
                    // Every chunk before this one is in place, so all the
                    // data the tree covers is: compute the tree once.
                    let mut fetched = false;
                    if !tree_written {
                        let v = m.image.verity.as_ref().expect("computed chunks come from a hash tree");
                        match write_tree(&out, v, disk) {
                            // The chunk across the data's end did not hold
                            // the data after all: fetch it, compute again.
                            Err(DeltaError::RootHash { .. }) if c.offset < v.hash_offset => {
                                tracing::info!("the data's last chunk was not in place; fetching it");
                                fetch_ranges(t, budget, image, new, &[(i, i)], &out, &path, &mut stats, &pb)?;
                                write_tree(&out, v, disk)?;
                                fetched = true;
                            }
                            other => other?,
                        }
                        tree_written = true;
                    }
                    if fetched {
                        buf.resize(c.len as usize, 0);
                        out.read_exact_at(&mut buf, c.offset).map_err(disk)?;
                    } else if read_chunk(&out, c.offset, c.len, &mut buf).map_err(disk)? == c.hash {
                        stats.computed += c.len as u64;
                        pb.inc(c.len as u64);
                    } else {
                        tracing::warn!("the computed hash tree differs at offset {}; fetching it", c.offset);
                        fetch_ranges(t, budget, image, new, &[(i, i)], &out, &path, &mut stats, &pb)?;
                        buf.resize(c.len as usize, 0);
                        out.read_exact_at(&mut buf, c.offset).map_err(disk)?;
                    }
                }
                Source::InPlace | Source::Fetch => {
                    if sources[i] == Source::InPlace {
                        stats.resumed += c.len as u64;
                        pb.inc(c.len as u64);
                    }
                    buf.resize(c.len as usize, 0);
                    out.read_exact_at(&mut buf, c.offset).map_err(disk)?;
                }
                Source::Local => {
                    // A seed whose bytes changed under its index is simply not used for this chunk.
                    let copied = have[&c.hash].iter().filter(|&&(_, _, len)| len == c.len).any(|&(si, off, len)| {
                        read_chunk(&seeds[si].file, off, len, &mut buf).is_ok_and(|h| h == c.hash)
                    });
                    if copied {
                        out.write_all_at(&buf, c.offset).map_err(disk)?;
                        stats.reused += c.len as u64;
                        pb.inc(c.len as u64);
                        if i % 64 == 0 {
                            pb.set_message(format!(
                                "downloaded {}, reused {}",
                                HumanBytes(stats.downloaded),
                                HumanBytes(stats.reused)
                            ));
                        }
                    } else {
                        tracing::warn!("local copy of the chunk at offset {} is corrupt; fetching it", c.offset);
                        fetch_ranges(t, budget, image, new, &[(i, i)], &out, &path, &mut stats, &pb)?;
                        buf.resize(c.len as usize, 0);
                        out.read_exact_at(&mut buf, c.offset).map_err(disk)?;
                    }
                }
            }
            // The hasher thread only ends when we drop the sender, so this cannot fail.
            let _ = tx.send(std::mem::take(&mut buf));
        }
        Ok(())
    })();
    drop(tx);
    let (found, _) = hasher.join().expect("the hashing thread does not panic");
    copy_result?;
    out.sync_all().map_err(disk)?;
    pb.finish_and_clear();
    if found != m.image.sha256 {
        return Err(DeltaError::Digest { expected: m.image.sha256, found });
    }
    Ok((stats, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, len: u32) -> Chunk {
        Chunk { offset, len, hash: ChunkHash::of(&offset.to_le_bytes()) }
    }

    #[test]
    fn only_wanted_chunks_wholly_in_the_tree_are_computed() {
        use imgdeploy_common::chunk::ChunkParams;
        let new = ChunkIndex {
            params: ChunkParams::default(),
            image_size: 400,
            chunks: vec![chunk(0, 100), chunk(100, 100), chunk(200, 100), chunk(300, 100)],
        };
        let v = Verity {
            root_hash: Sha256Digest([1; 32]),
            salt: Sha256Digest([2; 32]),
            hash_offset: 150,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash: verity::HASH.into(),
        };
        let mut sources = vec![Source::Fetch, Source::Fetch, Source::Local, Source::Fetch];
        assert_eq!(compute_tree(&mut sources, &new, None, true), 0);
        assert_eq!(sources, [Source::Fetch, Source::Fetch, Source::Local, Source::Fetch], "no tree, nothing computed");
        let mut with_data = sources.clone();
        assert_eq!(compute_tree(&mut sources, &new, Some(&v), false), 100);
        assert_eq!(
            sources,
            [Source::Fetch, Source::Fetch, Source::Local, Source::Computed],
            "the chunk across the tree's start is fetched, a local one copied"
        );
        assert_eq!(compute_tree(&mut with_data, &new, Some(&v), true), 200);
        assert_eq!(
            with_data,
            [Source::Fetch, Source::Computed, Source::Local, Source::Computed],
            "with the data in place, the chunk across the tree's start is computed too"
        );
        let at_start = Verity { hash_offset: 200, ..v };
        let mut sources = vec![Source::Fetch; 4];
        assert_eq!(
            compute_tree(&mut sources, &new, Some(&at_start), false),
            200,
            "a chunk starting at the tree is in it"
        );
    }

    /// The tree written after the data is byte for byte what the builder
    /// appends; a root that differs from the signed one is refused.
    #[test]
    fn the_computed_tree_is_the_built_one() {
        let data: Vec<u8> = (0..5 * verity::BLOCK_SIZE as usize).map(|i| (i * 31 % 251) as u8).collect();
        let mut built = tempfile::tempfile().unwrap();
        built.write_all_at(&data, 0).unwrap();
        let v = verity::append_tree(&mut built).unwrap();
        let size = built.metadata().unwrap().len();
        let mut expected = vec![0u8; size as usize];
        built.read_exact_at(&mut expected, 0).unwrap();

        let out = tempfile::tempfile().unwrap();
        out.write_all_at(&data, 0).unwrap();
        out.set_len(size).unwrap();
        let disk = |source| DeltaError::Disk { path: "out".into(), source };
        write_tree(&out, &v, disk).unwrap();
        let mut got = vec![0u8; size as usize];
        out.read_exact_at(&mut got, 0).unwrap();
        assert!(got == expected, "the computed tail differs from the built one");

        let wrong = Verity { root_hash: Sha256Digest([9; 32]), ..v };
        assert!(matches!(write_tree(&out, &wrong, disk), Err(DeltaError::RootHash { .. })));
    }

    #[test]
    fn coalesces_consecutive_chunks() {
        assert_eq!(coalesce(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        assert_eq!(coalesce(&[]), Vec::<(usize, usize)>::new());
    }
}
