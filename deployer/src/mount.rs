//! Read-only mounts of verified images, and what is mounted where.
//!
//! A mount point is identified by reading `/proc/self/mountinfo`, never by
//! guessing from directory contents, and a mounted slot's device number is
//! what [`crate::drain`] looks for in other processes.

use imgdeploy_common::report::Chain;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use imgdeploy_common::manifest::ImageFormat;

use imgdeploy_common::verity::Verity;

use crate::config::MountOptions;
use crate::integrity::{open_verity, warn_fallback_once, Integrity, VerityError};
use crate::loopdev;

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Setting up the loop device failed.
    #[error("cannot set up a loop device for {image}; run `modprobe loop` (the imgdeploy package loads it at boot through /usr/lib/modules-load.d/imgdeploy.conf)")]
    Loop {
        /// The image.
        image: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("the kernel refused to mount {image} at {target}; check that squashfs with zstd is available (`modprobe squashfs`)")]
    Mount {
        /// The image.
        image: PathBuf,
        /// The mount point.
        target: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// umount(2) failed.
    #[error("cannot unmount {target}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Reading the mount table failed.
    #[error("cannot read /proc/self/mountinfo")]
    Table(#[source] io::Error),
    /// No dm-verity device could be made, and `require_verity = true`.
    #[error("refusing to mount {image} without dm-verity (require_verity = true; set it to false to accept images checked at install only)")]
    VerityRequired {
        /// The image.
        image: PathBuf,
        /// Why there is none.
        #[source]
        source: VerityError,
    },
    /// A dm-verity device could not be made for another reason.
    #[error("cannot set up dm-verity for {image}")]
    Verity {
        /// The image.
        image: PathBuf,
        /// Why.
        #[source]
        source: VerityError,
    },
}

/// Whether and how to put a dm-verity device under a mount.
#[derive(Debug, Clone, Copy)]
pub struct VerityRequest<'a> {
    /// The state directory's tag (see [`crate::integrity::instance_tag`]).
    pub tag: &'a str,
    /// Names the device: the slot (`a`, `b`).
    pub slot: &'a str,
    /// Names the device: the image's serial.
    pub serial: u64,
    /// The signed hash tree parameters, if the image has a tree.
    pub tree: Option<&'a Verity>,
    /// Refuse to mount without verity (`require_verity = true`).
    pub required: bool,
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number (major, minor).
    pub dev: (u32, u32),
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source, e.g. `/dev/loop3`.
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(f.get(4)?))),
                fstype: r.first()?.to_string(),
                source: r.get(1).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// A mount that is undone when the guard is dropped, unless [`keep`] was
/// called: the standby's new mount stays only once `link` points at it, on
/// every path out of `apply` (an error, a failed hook, a panic).
///
/// [`keep`]: MountGuard::keep
#[must_use = "dropping the guard unmounts at once"]
pub struct MountGuard {
    target: PathBuf,
    armed: bool,
}

impl MountGuard {
    /// Guards the mount at `target`.
    pub fn new(target: &Path) -> Self {
        MountGuard { target: target.to_owned(), armed: true }
    }

    /// The mount stays.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.armed {
            // Already unwinding from the real error: this one is only logged.
            if let Err(e) = unmount(&self.target) {
                tracing::warn!("{}", Chain(&e));
            }
        }
    }
}

/// The mount at exactly `path`, if any (the last one, when stacked).
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::Table)?;
    Ok(parse_mountinfo(&text).into_iter().rev().find(|m| m.mount_point == path))
}

/// Loop-mounts the already-verified open image `file` (of `format`) read-only
/// at `target`, through a dm-verity device when `verity` asks for one and
/// the kernel can; says which it did.
pub fn mount_image(
    file: &File,
    format: ImageFormat,
    image: &Path,
    target: &Path,
    opts: MountOptions,
    label: &str,
    verity: Option<VerityRequest<'_>>,
) -> Result<Integrity, MountError> {
    let dev = loopdev::attach(file, label).map_err(|source| MountError::Loop { image: image.to_owned(), source })?;
    let mut flags = MsFlags::MS_RDONLY;
    for (on, flag) in [
        (opts.nodev, MsFlags::MS_NODEV),
        (opts.nosuid, MsFlags::MS_NOSUID),
        (opts.noexec, MsFlags::MS_NOEXEC),
        (opts.noatime, MsFlags::MS_NOATIME),
    ] {
        if on {
            flags |= flag;
        }
    }
    let checked = match verity {
        None => None,
        Some(req) => {
            let loop_dev = dev.number().map_err(|source| MountError::Loop { image: image.to_owned(), source })?;
            match open_verity(req.tag, req.slot, req.serial, loop_dev, req.tree) {
                Ok(v) => Some(v),
                Err(source) if req.required => {
                    return Err(MountError::VerityRequired { image: image.to_owned(), source })
                }
                Err(e) if e.is_unsupported() => {
                    warn_fallback_once(&e);
                    None
                }
                Err(source) => return Err(MountError::Verity { image: image.to_owned(), source }),
            }
        }
    };
    let source = checked.as_ref().map_or_else(|| dev.path.clone(), |v| v.info.node());
    let mounted = nix::mount::mount(Some(&source), target, Some(format.fstype()), flags, None::<&str>)
        .map_err(|source| MountError::Mount { image: image.to_owned(), target: target.to_owned(), source });
    // `dev` drops here: the mount (or the verity device) now holds the only
    // reference, and with LO_FLAGS_AUTOCLEAR the loop device detaches when
    // that goes away.
    match (checked, mounted) {
        (Some(v), Ok(())) => {
            v.release_with_mount();
            Ok(Integrity::Verity)
        }
        (Some(v), Err(e)) => {
            v.discard();
            Err(e)
        }
        (None, Ok(())) => Ok(Integrity::InstallTime),
        (None, Err(e)) => Err(e),
    }
}

/// Unmounts `target` (not lazily: a busy mount stays and the caller is told).
pub fn unmount(target: &Path) -> Result<(), MountError> {
    nix::mount::umount2(target, MntFlags::empty())
        .map_err(|source| MountError::Unmount { target: target.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    99 36 7:3 / /var/lib/imgdeploy\\040x/mnt/a ro,nosuid,nodev,relatime shared:50 - squashfs /dev/loop3 ro,errorsuseless\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].dev, (7, 3));
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/imgdeploy x/mnt/a"));
        assert_eq!((m[1].fstype.as_str(), m[1].source.as_str()), ("squashfs", "/dev/loop3"));
    }
}
