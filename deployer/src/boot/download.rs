//! Network mode's image: the channel's current manifest, verified with the
//! keys and channel the trusted initrd was built with, then its image
//! downloaded once into a tmpfs of its own and hashed there before anything
//! mounts it.
//!
//! Every failure (no network, an origin down, a manifest that does not
//! verify, an image whose sha256 is wrong) is printed on the console and
//! retried: each mirror in turn, then again after a doubling wait, until
//! `imgdeploy.timeout=` has passed; then the caller applies `onfail`. A
//! download cut short resumes where it stopped (HTTP Range) on the next try;
//! a complete file whose hash is wrong is thrown away.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgdeploy_common::location::Location;
use imgdeploy_common::manifest::Manifest;
use imgdeploy_common::netboot::{BootPolicy, NetworkPolicy, NET_IMAGE_DIR};
use imgdeploy_common::report::one_line;
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::transport::Transport;
use imgdeploy_common::trust::verify_signed;
use nix::mount::MsFlags;

use super::params::{Backoff, BootParams};
use super::{accept, mount_fs, network};
use crate::slot::check_image;

/// The longest wait between rounds of attempts.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Memory left free beyond the image, for the kernel and the booted system's start.
const HEADROOM: u64 = 64 << 20;

/// A verified image in RAM.
pub struct Downloaded {
    /// The image, opened read-only after it verified.
    pub file: File,
    /// Where it is.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The key that signed it.
    pub key_id: String,
}

/// Fetches and verifies the channel's current image from `urls` (in order),
/// retrying until `params.timeout`.
pub fn fetch_current(
    params: &BootParams,
    policy: &BootPolicy,
    net: &NetworkPolicy,
    keys: &[PublicKey],
    urls: &[String],
) -> Result<Downloaded> {
    let deadline = Instant::now() + params.timeout;
    mount_fs("tmpfs", NET_IMAGE_DIR, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0700,size=100%"))?;
    let mut backoff = Backoff::new(MAX_WAIT);
    let mut up = None;
    for round in 1u32.. {
        if up.is_none() {
            match network::bring_up(net, &params.ip) {
                Ok(c) => {
                    eprintln!(
                        "imgdeploy: network: {} {}/{}{}",
                        c.device.as_deref().unwrap_or("?"),
                        c.address,
                        c.prefix,
                        c.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
                    );
                    up = Some(c);
                }
                Err(e) => eprintln!("imgdeploy: attempt {round}: network: {}", one_line(e.as_ref())),
            }
        }
        if up.is_some() {
            for url in urls {
                let left = deadline.saturating_duration_since(Instant::now());
                match fetch_from(url, left, params, policy, keys) {
                    Ok(d) => return Ok(d),
                    Err(e) => eprintln!("imgdeploy: attempt {round}: {url}: {}", one_line(e.as_ref())),
                }
            }
        }
        let wait = backoff.next_wait();
        let left = deadline.saturating_duration_since(Instant::now());
        if left <= wait {
            bail!(
                "no verified image after {round} attempts in {} s (imgdeploy.timeout={}); \
                 check the network and the origin, or add a mirror with imgdeploy.url=",
                params.timeout.as_secs(),
                params.timeout.as_secs()
            );
        }
        eprintln!("imgdeploy: trying again in {} s", wait.as_secs());
        std::thread::sleep(wait);
    }
    unreachable!("the rounds are counted by a u32 and a round lasts at least a second")
}

/// One attempt at one URL, within `left`.
fn fetch_from(
    url: &str,
    left: Duration,
    params: &BootParams,
    policy: &BootPolicy,
    keys: &[PublicKey],
) -> Result<Downloaded> {
    let t = Transport::public(left.min(Duration::from_secs(15)), left);
    let loc = Location::parse(url);
    let (bytes, sig) = loc.read_signed_manifest(&t)?;
    let v = verify_signed(&bytes, &sig, keys)
        .with_context(|| format!("manifest {url} does not verify with the keys this initrd trusts"))?;
    accept(params, policy, &v.manifest)?;
    let m = v.manifest;
    check_memory(m.image.size, Path::new(NET_IMAGE_DIR))?;
    let image = loc.sibling(&m.image.path);
    let (path, _) = download(&t, &image, &m, Path::new(NET_IMAGE_DIR))?;
    let mut file = File::open(&path)?;
    if let Err(e) = check_image(&mut file, &m) {
        let _ = fs::remove_file(&path);
        return Err(anyhow::Error::new(e).context(format!("image {image} of serial {}", m.serial)));
    }
    Ok(Downloaded { file, path, manifest: m, key_id: v.key_id })
}

/// Refuses an image that would not fit in memory with room to run.
fn check_memory(size: u64, dir: &Path) -> Result<()> {
    let Some(available) = mem_available() else { return Ok(()) };
    // What an earlier, interrupted attempt already put in RAM counts as available.
    let partial: u64 =
        fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    fits_in_memory(size, available, partial)
}

/// Whether an image of `size` bytes fits beside [`HEADROOM`], given the
/// memory `available` and the bytes of it `already` downloaded.
fn fits_in_memory(size: u64, available: u64, already: u64) -> Result<()> {
    let free = available + already;
    if size + HEADROOM > free {
        bail!(
            "the image is {} MiB but only {} MiB of memory is free; give the machine at least {} MiB more",
            size >> 20,
            free >> 20,
            (size + HEADROOM - free).div_ceil(1 << 20)
        );
    }
    Ok(())
}

fn mem_available() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reports a download's progress each time it passes a tenth.
struct Progress {
    size: u64,
    step: u64,
    next: u64,
}

impl Progress {
    fn new(size: u64, from: u64) -> Self {
        let step = (size / 10).max(1);
        Progress { size, step, next: (from / step + 1) * step }
    }

    /// The percentage to print, when `at` bytes have arrived and it is time to.
    fn at(&mut self, at: u64) -> Option<u64> {
        if at < self.next || at >= self.size {
            return None;
        }
        self.next = (at / self.step + 1) * self.step;
        Some(at * 100 / self.size)
    }
}

/// What a transfer from `start` of `size` bytes says as it begins.
fn starting(image: &Location, start: u64, size: u64) -> String {
    if start > 0 {
        format!("resuming {image} at {} of {} MiB", start >> 20, size >> 20)
    } else {
        format!("downloading {image} ({} MiB)", size.div_ceil(1 << 20))
    }
}

/// Downloads `image` into `dir` as `<sha256>.partial`, resuming one left by
/// an earlier attempt, and renames it to `<sha256>.squashfs` once it has
/// the manifest's size. Partial files of other images are removed. Returns
/// the file and the offset the transfer started at (0 unless it resumed).
fn download(t: &Transport, image: &Location, m: &Manifest, dir: &Path) -> Result<(PathBuf, u64)> {
    let sha = m.image.sha256;
    let size = m.image.size;
    let done = dir.join(format!("{sha}.squashfs"));
    if done.exists() {
        return Ok((done, size));
    }
    let part = dir.join(format!("{sha}.partial"));
    for e in fs::read_dir(dir)?.flatten() {
        if e.path() != part {
            let _ = fs::remove_file(e.path());
        }
    }
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&part)?;
    // A partial file of the full size (complete but not renamed) needs no
    // request at all: a Range from its end would be answered 416.
    let have = match f.metadata()?.len() {
        n if n > size => 0,
        n => n,
    };
    // Where this transfer started: the size itself when nothing was fetched.
    let mut from = size;
    if have < size {
        let (reader, start) = image.open(t, have)?;
        f.set_len(start)?;
        f.seek(SeekFrom::Start(start))?;
        eprintln!("imgdeploy: {}", starting(image, start, size));
        let mut at = start;
        // Bytes past `size` are refused as they arrive, at most a buffer late.
        let mut reader = reader;
        let mut buf = vec![0u8; 1 << 20];
        let mut progress = Progress::new(size, start);
        loop {
            let n = reader.read(&mut buf).map_err(|e| image.read_error(e))?;
            if n == 0 {
                break;
            }
            if at + n as u64 > size {
                drop(f);
                let _ = fs::remove_file(&part);
                bail!("{image} is longer than the {size} bytes its manifest signs");
            }
            f.write_all(&buf[..n]).context("writing the image to RAM")?;
            at += n as u64;
            if let Some(pct) = progress.at(at) {
                eprintln!("imgdeploy: {pct} %");
            }
        }
        if at < size {
            bail!("{image} ended at byte {at} of {size}; the next attempt resumes there");
        }
        f.sync_all()?;
        from = start;
    }
    fs::rename(&part, &done)?;
    Ok((done, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgdeploy_common::digest::Sha256Digest;
    use imgdeploy_common::manifest::{image_path, ImageFormat, ImageRef, Timestamp, FORMAT_VERSION};

    fn manifest_for(bytes: &[u8]) -> Manifest {
        let sha256 = Sha256Digest::of_bytes(bytes);
        Manifest {
            format: FORMAT_VERSION,
            channel: "stable".into(),
            serial: 1,
            version: "v1".into(),
            created: Timestamp(1_700_000_000),
            expires: Timestamp(1_700_000_000 + 86400),
            image: ImageRef {
                path: image_path(&sha256),
                sha256,
                size: bytes.len() as u64,
                format: ImageFormat::Squashfs,
                compression: "zstd".into(),
                verity: None,
                checkpoints: Vec::new(),
            },
            index: None,
            rollout: None,
            block_map: None,
            deltas: Vec::new(),
        }
    }

    fn setup(len: usize) -> (tempfile::TempDir, Location, Vec<u8>, Manifest) {
        let d = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let src = d.path().join("origin.img");
        fs::write(&src, &bytes).unwrap();
        fs::create_dir(d.path().join("ram")).unwrap();
        let m = manifest_for(&bytes);
        (d, Location::Path(src), bytes, m)
    }

    fn t() -> Transport {
        Transport::public(Duration::from_secs(5), Duration::from_secs(5))
    }

    #[test]
    fn a_download_resumes_where_the_last_attempt_stopped() {
        let (d, src, bytes, m) = setup(3 << 20);
        let ram = d.path().join("ram");
        // An earlier attempt left the first 1.5 MiB, and an old image's partial file.
        fs::write(ram.join(format!("{}.partial", m.image.sha256)), &bytes[..3 << 19]).unwrap();
        fs::write(ram.join("0000.partial"), b"old").unwrap();
        let (path, from) = download(&t(), &src, &m, &ram).unwrap();
        assert_eq!(from, 3 << 19, "did not resume");
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(path, ram.join(format!("{}.squashfs", m.image.sha256)));
        let left: Vec<_> = fs::read_dir(&ram).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(left, std::slice::from_ref(&path), "other files left in RAM");
        // Done once is done: the next call does not fetch again.
        fs::remove_file(src.to_string()).unwrap();
        assert_eq!(download(&t(), &src, &m, &ram).unwrap().0, path);
    }

    #[test]
    fn a_complete_partial_file_is_not_fetched_again() {
        let (d, src, bytes, m) = setup(100_000);
        let ram = d.path().join("ram");
        fs::write(ram.join(format!("{}.partial", m.image.sha256)), &bytes).unwrap();
        fs::remove_file(src.to_string()).unwrap();
        let (path, from) = download(&t(), &src, &m, &ram).unwrap();
        assert_eq!((fs::read(path).unwrap(), from), (bytes, 100_000));
    }

    #[test]
    fn progress_is_printed_about_every_tenth() {
        let mut p = Progress::new(1000, 0);
        let printed: Vec<u64> = (1..=1000).step_by(7).filter_map(|at| p.at(at)).collect();
        assert_eq!(printed, [10, 20, 30, 40, 50, 60, 70, 80, 90]);
        let mut p = Progress::new(1000, 500);
        let printed: Vec<u64> = (501..=1000).step_by(50).filter_map(|at| p.at(at)).collect();
        assert_eq!(printed, [60, 70, 80, 90]);
        assert_eq!(Progress::new(1000, 0).at(1000), None, "the end is not a step");
        assert_eq!(Progress::new(1000, 0).at(100), Some(10), "exactly a tenth is a step");
        let img = Location::parse("http://o/i.squashfs");
        assert_eq!(starting(&img, 0, (1 << 20) + 1), "downloading http://o/i.squashfs (2 MiB)");
        assert_eq!(starting(&img, 3 << 20, 10 << 20), "resuming http://o/i.squashfs at 3 of 10 MiB");
        assert_eq!(starting(&img, 1, 10 << 20), "resuming http://o/i.squashfs at 0 of 10 MiB");
    }

    #[test]
    fn a_partial_file_longer_than_the_image_starts_over() {
        let (d, src, bytes, m) = setup(100_000);
        let ram = d.path().join("ram");
        fs::write(ram.join(format!("{}.partial", m.image.sha256)), vec![9u8; 200_000]).unwrap();
        let (path, from) = download(&t(), &src, &m, &ram).unwrap();
        assert_eq!((fs::read(path).unwrap(), from), (bytes, 0));
    }

    #[test]
    fn an_origin_with_more_or_fewer_bytes_than_signed_is_refused() {
        let (d, src, bytes, mut m) = setup(100_000);
        let ram = d.path().join("ram");
        m.image.size = 99_999;
        let e = download(&t(), &src, &m, &ram).unwrap_err().to_string();
        assert!(e.contains("longer than the 99999 bytes"), "{e}");
        assert_eq!(fs::read_dir(&ram).unwrap().count(), 0, "a too-long download was kept");
        m.image.size = 100_001;
        let e = download(&t(), &src, &m, &ram).unwrap_err().to_string();
        assert!(e.contains("ended at byte 100000 of 100001"), "{e}");
        // Kept for the next attempt to resume.
        assert_eq!(fs::read(ram.join(format!("{}.partial", m.image.sha256))).unwrap(), bytes);
    }

    #[test]
    fn memory_check_counts_what_is_already_downloaded() {
        const MIB: u64 = 1 << 20;
        assert!(fits_in_memory(100 * MIB, 164 * MIB, 0).is_ok());
        let e = fits_in_memory(100 * MIB + 1, 164 * MIB, 0).unwrap_err().to_string();
        assert_eq!(e, "the image is 100 MiB but only 164 MiB of memory is free; give the machine at least 1 MiB more");
        // 30 MiB already downloaded count as free.
        assert!(fits_in_memory(100 * MIB, 134 * MIB, 30 * MIB).is_ok());
        assert!(fits_in_memory(100 * MIB, 134 * MIB, 29 * MIB).is_err());
        // This machine's own reading: a small image fits, one of all its memory does not.
        let d = tempfile::tempdir().unwrap();
        let avail = mem_available().expect("/proc/meminfo");
        assert!(avail > 64 * MIB);
        assert!(check_memory(MIB, d.path()).is_ok());
        assert!(check_memory(avail, d.path()).is_err());
        // What lies in the directory counts as already downloaded.
        fs::write(d.path().join("x.partial"), vec![0u8; 1 << 20]).unwrap();
        assert!(check_memory(avail - HEADROOM / 2, d.path()).is_err());
    }
}
