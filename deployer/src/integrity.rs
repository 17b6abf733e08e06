//! Runtime integrity: every slot is mounted through a read-only dm-verity
//! device built from the root hash the manifest signs, so a block changed
//! on disk after install (a flipped bit, a write by anything running as
//! root) reads as an I/O error, never as other bytes.
//!
//! Where the kernel has no device-mapper or no dm-verity target (or the
//! image was built before hash trees) the slot is mounted over the bare
//! loop device as before, checked once at install ("install-time"); this is
//! said once per run, shown by `status` and the metrics, and refused
//! outright with `require_verity = true`.
//!
//! Devices are named `imgdeploy-<slot>-<serial>-<nonce>` with a uuid
//! `IMGDEPLOY-VERITY-<tag>-<name>`, where the tag identifies the state
//! directory (two instances on one host never touch each other's). Once
//! mounted, each is marked for deferred removal, so the kernel removes it
//! when its filesystem is finally unmounted (detached versions included)
//! and no crash after that point can leak one. A crash between creating and
//! mounting leaves an unopened device: [`remove_stale`] clears those on
//! every apply, mount and rollback, under the state directory's lock.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use imgdeploy_common::verity::Verity;
use serde::Serialize;

use crate::devmapper::{Control, DeviceInfo};

const NAME_PREFIX: &str = "imgdeploy-";
const UUID_PREFIX: &str = "IMGDEPLOY-VERITY-";

/// How a mounted slot's reads are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Integrity {
    /// Every block read is checked against the signed root hash.
    Verity,
    /// The whole image was hashed before it was mounted; reads are not checked.
    InstallTime,
}

impl Integrity {
    /// As `status` and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Integrity::Verity => "verity",
            Integrity::InstallTime => "install-time",
        }
    }

    /// For people: what it means for reads.
    pub fn describe(self) -> &'static str {
        match self {
            Integrity::Verity => "every read checked by dm-verity",
            Integrity::InstallTime => "checked at install only",
        }
    }
}

/// Why a verity device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The manifest signs no hash tree.
    #[error("its manifest has no dm-verity hash tree (built by an imgbuild older than hash trees); rebuild and publish the image")]
    NoTree,
    /// No device-mapper in this kernel.
    #[error("the kernel has no device-mapper (cannot open /dev/mapper/control); load it with `modprobe dm-verity`")]
    NoDeviceMapper(#[source] io::Error),
    /// The kernel refused the verity table (no dm-verity target, or bad parameters).
    #[error("the kernel refused the dm-verity table; load the target with `modprobe dm-verity`")]
    Table(#[source] io::Error),
    /// The device was made but its node did not appear.
    #[error("/dev/dm-{0} did not appear; is devtmpfs mounted on /dev?")]
    NoNode(u32),
}

impl VerityError {
    /// Whether this only means "this host cannot do verity" (fall back
    /// unless verity is required) rather than something to stop for.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, VerityError::NoTree | VerityError::NoDeviceMapper(_) | VerityError::Table(_))
    }
}

/// A live verity device (not yet mounted).
#[derive(Debug)]
pub struct VerityDevice {
    control: Control,
    /// What the kernel says of it.
    pub info: DeviceInfo,
}

impl VerityDevice {
    /// Marks the device for removal when its (just made) mount goes away.
    pub fn release_with_mount(self) {
        if let Err(e) = self.control.remove(&self.info.name, true) {
            tracing::warn!("cannot mark {} for removal at unmount: {e}", self.info.name);
        }
    }

    /// Removes the device now (its mount failed).
    pub fn discard(self) {
        if let Err(e) = self.control.remove(&self.info.name, false) {
            tracing::warn!("cannot remove {}: {e}", self.info.name);
        }
    }
}

/// The tag of a state directory in our devices' uuids: 8 hex digits of
/// the sha256 of its path.
pub fn instance_tag(state_dir: &Path) -> String {
    imgdeploy_common::digest::Sha256Digest::of_bytes(state_dir.as_os_str().as_encoded_bytes()).to_string()[..8]
        .to_owned()
}

fn uuid_prefix(tag: &str) -> String {
    format!("{UUID_PREFIX}{tag}-")
}

/// Builds a dm-verity device for `slot`'s image over the loop device
/// `loop_dev` (major, minor), from the signed parameters in `v`; `tag` is
/// the state directory's [`instance_tag`].
pub fn open_verity(
    tag: &str,
    slot: &str,
    serial: u64,
    loop_dev: (u32, u32),
    v: Option<&Verity>,
) -> Result<VerityDevice, VerityError> {
    let v = v.ok_or(VerityError::NoTree)?;
    let control = Control::open().map_err(VerityError::NoDeviceMapper)?;
    let dev = format!("{}:{}", loop_dev.0, loop_dev.1);
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("{NAME_PREFIX}{slot}-{serial}-{:x}{:x}", std::process::id(), nonce);
    let uuid = format!("{}{name}", uuid_prefix(tag));
    let info = control
        .create(&name, &uuid, v.data_blocks() * (v.data_block_size as u64 / 512), "verity", &v.table_params(&dev))
        .map_err(VerityError::Table)?;
    let node = info.node();
    // devtmpfs creates the node as the device is registered; allow a moment.
    for _ in 0..100 {
        if node_is(&node, info.dev) {
            return Ok(VerityDevice { control, info });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let minor = info.dev.1;
    VerityDevice { control, info }.discard();
    Err(VerityError::NoNode(minor))
}

fn node_is(path: &Path, dev: (u32, u32)) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(path).is_ok_and(|m| {
        m.file_type().is_block_device()
            && (libc::major(m.rdev() as libc::dev_t), libc::minor(m.rdev() as libc::dev_t)) == dev
    })
}

static SAID: AtomicBool = AtomicBool::new(false);

/// Says once per run that slots are mounted without verity, and why.
pub fn warn_fallback_once(why: &VerityError) {
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "mounting without dm-verity: {why}; reads are not checked after install (set require_verity = true to refuse this)"
        );
    }
}

/// Removes the verity devices of the state directory tagged `tag` that
/// nothing has open: left by a crash between creating one and mounting it.
/// Devices of others (other instances, other software) are never touched.
/// The caller holds the state directory's lock.
pub fn remove_stale(tag: &str) -> io::Result<usize> {
    let ours = uuid_prefix(tag);
    let control = match Control::open() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for name in control.list()? {
        if !name.starts_with(NAME_PREFIX) {
            continue;
        }
        let Ok(info) = control.status(&name) else { continue };
        if !info.uuid.starts_with(&ours) || info.open_count != 0 {
            continue;
        }
        match control.remove(&name, false) {
            Ok(()) => {
                tracing::info!("removed the stale dm-verity device {name} (left by an interrupted mount)");
                removed += 1;
            }
            Err(e) => tracing::warn!("cannot remove the stale dm-verity device {name}: {e}"),
        }
    }
    Ok(removed)
}

/// [`of_mounted`] for whatever is mounted at `mount_point`; `None` when
/// nothing is (or the mount table cannot be read).
pub fn of_mount_point(mount_point: &Path) -> Option<(Integrity, bool)> {
    crate::mount::mounted_at(mount_point).ok().flatten().map(|m| of_mounted(m.dev))
}

/// What the device a slot is mounted from says about integrity: verity
/// (and whether it has seen a corrupted block) for our dm-verity devices,
/// install-time for anything else.
pub fn of_mounted(dev: (u32, u32)) -> (Integrity, bool) {
    let sys = format!("/sys/dev/block/{}:{}/dm", dev.0, dev.1);
    let read = |f: &str| std::fs::read_to_string(format!("{sys}/{f}")).map(|s| s.trim().to_owned());
    let (Ok(name), Ok(uuid)) = (read("name"), read("uuid")) else { return (Integrity::InstallTime, false) };
    if !uuid.starts_with(UUID_PREFIX) {
        return (Integrity::InstallTime, false);
    }
    let corrupted = Control::open()
        .and_then(|c| c.target_status(&name))
        .map(|lines| lines.iter().any(|l| l.split_whitespace().next() == Some("C")))
        .unwrap_or(false);
    (Integrity::Verity, corrupted)
}
