//! Getting a manifest and an image from the source.
//!
//! The manifest and its signature are read with hard size limits and
//! verified before anything else looks at them. The image is streamed into
//! the standby slot's `image.partial`, hashed as it arrives, never read past
//! the signed size, and resumed with an HTTP Range request on the next run
//! when a transfer broke (`partial.json` records which image the partial
//! bytes belong to, so a partial download of another image is discarded).

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use imgdeploy_common::atomic::{fsync_dir, write_atomic};
use imgdeploy_common::digest::{Sha256Digest, StreamHasher};
use imgdeploy_common::location::{FetchError, Location, ManifestFetchError, SignedManifest};
use imgdeploy_common::manifest::{Manifest, Timestamp};
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::transport::Transport;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::state::{Layout, SlotId};

/// Why fetching failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Transport, status or local read error.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The manifest was refused (signature, contents or expiry).
    #[error(transparent)]
    Manifest(ManifestFetchError),
    /// The manifest is for another channel.
    #[error("manifest {source_url} is for channel `{found}` but this host follows `{expected}`; check `source` and `channel` in the config")]
    Channel {
        /// Where it came from.
        source_url: String,
        /// Channel in the manifest.
        found: String,
        /// Configured channel.
        expected: String,
    },
    /// The server sent more than the signed size.
    #[error("image {url} is longer than the {size} bytes its manifest signs; the server or a proxy is serving the wrong file")]
    TooLong {
        /// URL.
        url: String,
        /// Signed size.
        size: u64,
    },
    /// The transfer ended early.
    #[error("image {url} ended after {got} of {size} bytes; rerun to resume the download")]
    Short {
        /// URL.
        url: String,
        /// Bytes received in total.
        got: u64,
        /// Signed size.
        size: u64,
    },
    /// The bytes do not hash to the signed sha256.
    #[error("image {url} has sha256 {found} but its manifest signs {expected}; the download was corrupted or tampered with and has been discarded")]
    Digest {
        /// URL.
        url: String,
        /// Signed.
        expected: Sha256Digest,
        /// Computed.
        found: Sha256Digest,
    },
    /// Local disk error (full disk, permissions).
    #[error("cannot write {path}; free space in state_dir and rerun (the download resumes)")]
    Disk {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A verified manifest with the exact bytes it was verified from.
pub type FetchedManifest = SignedManifest;

/// Fetches `<source>` and its signature (`sigs/<sha256>.sig` beside it, else `<source>.sig`), verifies them against `keys` and checks the channel.
pub fn fetch_manifest(
    t: &Transport,
    source: &Location,
    keys: &[PublicKey],
    channel: &str,
) -> Result<FetchedManifest, DownloadError> {
    let fetched = source.fetch_verified_manifest(t, keys, Timestamp::now()).map_err(|e| match e {
        ManifestFetchError::Fetch(e) => DownloadError::Fetch(e),
        refused => DownloadError::Manifest(refused),
    })?;
    if fetched.verified.manifest.channel != channel {
        return Err(DownloadError::Channel {
            source_url: source.to_string(),
            found: fetched.verified.manifest.channel,
            expected: channel.to_owned(),
        });
    }
    Ok(fetched)
}

/// Which image `image.partial` belongs to, and how it is being filled.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartialMeta {
    /// The image's sha256.
    pub sha256: Sha256Digest,
    /// Its size.
    pub size: u64,
    /// Filled chunk by chunk at random offsets (not a resumable prefix).
    #[serde(default)]
    pub delta: bool,
}

impl PartialMeta {
    /// Records it atomically.
    pub fn save(&self, layout: &Layout, slot: SlotId) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(self).expect("serialises");
        bytes.push(b'\n');
        write_atomic(&layout.partial_meta(slot), &bytes, 0o600)
    }
}

/// How an image reached the standby slot (`full`, `delta` or `none` in JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferMode {
    /// The whole image was downloaded (or resumed).
    #[default]
    Full,
    /// Rebuilt from local chunks plus the missing ones.
    Delta,
    /// Made from a local image by a static delta (then checked chunk by
    /// chunk, with any chunk that did not reproduce fetched).
    StaticDelta,
    /// Nothing to transfer: the standby already held the image.
    None,
}

impl std::fmt::Display for TransferMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransferMode::Full => "full download",
            TransferMode::Delta => "delta download",
            TransferMode::StaticDelta => "static delta",
            TransferMode::None => "nothing downloaded (the standby held the image)",
        })
    }
}

/// What a download did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DownloadStats {
    /// How the image arrived.
    pub mode: TransferMode,
    /// Bytes received from the server in this run (image data; the manifest and index are extra).
    pub downloaded: u64,
    /// Bytes reused from an earlier interrupted run.
    pub resumed_from: u64,
    /// Bytes copied from images already on this host (delta).
    pub reused: u64,
    /// Bytes of the dm-verity hash tree computed on this host (delta).
    pub computed: u64,
    /// HTTP requests for image data.
    pub requests: u64,
    /// Bytes of image blocks made here by a static delta's patches.
    pub patched: u64,
    /// Bytes of the static delta file fetched (included in `downloaded`).
    pub static_delta: u64,
}

fn disk(path: &Path) -> impl Fn(io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Disk { path: path.display().to_string(), source }
}

fn progress(total: u64, start: u64) -> ProgressBar {
    // Hidden automatically when stderr is not a terminal (timers, CI, journald).
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_position(start);
    pb
}

/// How [`stream_hashed`] stopped early.
#[derive(Debug)]
pub enum Streamed {
    /// Reading the source failed (what came before it is written).
    Read(io::Error),
    /// Writing failed.
    Write(io::Error),
    /// The source had more than the limit.
    TooLong,
}

/// Copies `reader` to `w` to its end, hashing every byte written, never
/// more than `limit` bytes (one more is an error, and is not written);
/// `written` gets the running total. Returns the bytes copied. The one
/// loop behind every signed-size download.
pub fn stream_hashed(
    reader: impl Read,
    w: &mut impl Write,
    hasher: &mut StreamHasher,
    limit: u64,
    mut written: impl FnMut(u64),
) -> Result<u64, Streamed> {
    let mut limited = reader.take(limit + 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Streamed::Read(e)),
        };
        if total + n as u64 > limit {
            return Err(Streamed::TooLong);
        }
        w.write_all(&buf[..n]).map_err(Streamed::Write)?;
        hasher.update(&buf[..n]);
        total += n as u64;
        written(total);
    }
}

/// Downloads the image of `manifest` (at `image`) into `slot`'s partial file,
/// resuming an earlier partial of the same image. On success the verified
/// bytes are in `layout.partial(slot)`, fsynced, and that file is returned
/// open: its sha256 covered exactly the bytes in it.
pub fn download_image(
    t: &Transport,
    image: &Location,
    manifest: &Manifest,
    layout: &Layout,
    slot: SlotId,
) -> Result<(DownloadStats, std::fs::File), DownloadError> {
    let size = manifest.image.size;
    let partial = layout.partial(slot);
    let meta_path = layout.partial_meta(slot);
    let want = PartialMeta { sha256: manifest.image.sha256, size, delta: false };
    let same_image =
        std::fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice::<PartialMeta>(&b).ok()).as_ref()
            == Some(&want);
    let mut have = if same_image { std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) } else { 0 };
    if have > size {
        have = 0;
    }
    if !same_image || have == 0 {
        want.save(layout, slot).map_err(disk(&meta_path))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(disk(&partial))?;
    file.set_len(have).map_err(disk(&partial))?;
    // Hash what an earlier run already fetched; it is only trusted if the whole file matches.
    let mut hasher = StreamHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    if have > 0 {
        (&file).seek(SeekFrom::Start(0)).map_err(disk(&partial))?;
        let mut prefix = (&file).take(have);
        loop {
            let n = prefix.read(&mut buf).map_err(disk(&partial))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let mut stats = DownloadStats { mode: TransferMode::Full, resumed_from: have, ..Default::default() };
    if have < size {
        let (reader, start) = image.open(t, have)?;
        stats.requests += 1;
        if start == 0 && have > 0 {
            tracing::warn!("{image} ignored the Range request; downloading the whole image again");
            file.set_len(0).map_err(disk(&partial))?;
            hasher = StreamHasher::new();
            have = 0;
            stats.resumed_from = 0;
        }
        if have > 0 {
            tracing::info!("resuming download of {image} at byte {have} of {size}");
        }
        let pb = progress(size, have);
        let mut w = io::BufWriter::with_capacity(1 << 20, &file);
        w.seek(SeekFrom::Start(have)).map_err(disk(&partial))?;
        let start = have;
        let streamed = stream_hashed(reader, &mut w, &mut hasher, size - have, |n| {
            have = start + n;
            pb.set_position(have);
        });
        stats.downloaded += have - start;
        match streamed {
            Ok(_) => {}
            Err(Streamed::Read(e)) => {
                // Keep what arrived: the next run resumes from here.
                w.flush().map_err(disk(&partial))?;
                drop(w);
                file.sync_all().map_err(disk(&partial))?;
                return Err(image.read_error(e).into());
            }
            Err(Streamed::Write(e)) => return Err(disk(&partial)(e)),
            Err(Streamed::TooLong) => {
                drop(w);
                // The file is not trustworthy as a resume point either.
                let _ = std::fs::remove_file(&partial);
                return Err(DownloadError::TooLong { url: image.to_string(), size });
            }
        }
        w.flush().map_err(disk(&partial))?;
        drop(w);
        pb.finish_and_clear();
        file.sync_all().map_err(disk(&partial))?;
        if have < size {
            return Err(DownloadError::Short { url: image.to_string(), got: have, size });
        }
    }
    let (found, n) = hasher.finish();
    debug_assert_eq!(n, size);
    if found != manifest.image.sha256 {
        // A corrupt partial must not be resumed: start over next time.
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&meta_path);
        return Err(DownloadError::Digest { url: image.to_string(), expected: manifest.image.sha256, found });
    }
    fsync_dir(&layout.slot_dir(slot)).map_err(disk(&partial))?;
    Ok((stats, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that gives `data`, then fails.
    struct Breaks<'a>(&'a [u8]);

    impl Read for Breaks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
            }
            self.0.read(buf)
        }
    }

    #[test]
    fn streams_hash_what_they_write_and_stop_at_the_limit() {
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let (mut out, mut h, mut seen) = (Vec::new(), StreamHasher::new(), Vec::new());
        let n = stream_hashed(&data[..], &mut out, &mut h, data.len() as u64, |t| seen.push(t)).unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(out == data);
        assert_eq!(h.finish(), (Sha256Digest::of_bytes(&data), data.len() as u64));
        assert_eq!(seen.last(), Some(&n));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "a running total: {seen:?}");
        // One byte more than the limit: refused, and not written.
        let (mut out, mut h) = (Vec::new(), StreamHasher::new());
        let err = stream_hashed(&data[..], &mut out, &mut h, data.len() as u64 - 1, |_| ()).unwrap_err();
        assert!(matches!(err, Streamed::TooLong), "{err:?}");
        assert!(out.len() < data.len());
        // A broken source: what came before the break is written and hashed.
        let (mut out, mut h) = (Vec::new(), StreamHasher::new());
        let err = stream_hashed(Breaks(&data[..1000]), &mut out, &mut h, 1 << 30, |_| ()).unwrap_err();
        assert!(matches!(err, Streamed::Read(_)), "{err:?}");
        assert!(out == data[..1000]);
        assert_eq!(h.finish(), (Sha256Digest::of_bytes(&data[..1000]), 1000));
        // A sink that fails.
        let mut full = [0u8; 10];
        let err = stream_hashed(&data[..], &mut &mut full[..], &mut StreamHasher::new(), 1 << 30, |_| ()).unwrap_err();
        assert!(matches!(err, Streamed::Write(_)), "{err:?}");
    }
}
