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
    let path = download(&t, &image, &m, Path::new(NET_IMAGE_DIR))?;
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
    if size + HEADROOM > available + partial {
        bail!(
            "the image is {} MiB but only {} MiB of memory is free; give the machine at least {} MiB more",
            size >> 20,
            (available + partial) >> 20,
            (size + HEADROOM - available - partial).div_ceil(1 << 20)
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

/// Downloads `image` into `dir` as `<sha256>.partial`, resuming one left by
/// an earlier attempt, and renames it to `<sha256>.squashfs` once it has
/// the manifest's size. Partial files of other images are removed.
fn download(t: &Transport, image: &Location, m: &Manifest, dir: &Path) -> Result<PathBuf> {
    let sha = m.image.sha256;
    let done = dir.join(format!("{sha}.squashfs"));
    if done.exists() {
        return Ok(done);
    }
    let part = dir.join(format!("{sha}.partial"));
    for e in fs::read_dir(dir)?.flatten() {
        if e.path() != part {
            let _ = fs::remove_file(e.path());
        }
    }
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&part)?;
    let mut have = f.metadata()?.len();
    if have > m.image.size {
        have = 0;
    }
    let (reader, start) = image.open(t, have)?;
    f.set_len(start)?;
    f.seek(SeekFrom::Start(start))?;
    let size = m.image.size;
    if start > 0 {
        eprintln!("imgdeploy: resuming {image} at {} of {} MiB", start >> 20, size >> 20);
    } else {
        eprintln!("imgdeploy: downloading {image} ({} MiB)", size.div_ceil(1 << 20));
    }
    let mut reader = reader.take(size - start + 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    let mut next_report = size / 10;
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
        if at >= next_report && at < size {
            eprintln!("imgdeploy: {} %", at * 100 / size.max(1));
            next_report = at + size / 10;
        }
    }
    if at < size {
        bail!("{image} ended at byte {at} of {size}; the next attempt resumes there");
    }
    f.sync_all()?;
    fs::rename(&part, &done)?;
    Ok(done)
}
