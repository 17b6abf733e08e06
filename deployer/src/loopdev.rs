//! Loop devices set up in-process with the kernel's ioctls: the one module of
//! `imgdeploy` that contains `unsafe`.
//!
//! `LOOP_CTL_GET_FREE` picks a free device, `LOOP_CONFIGURE` binds our
//! already-verified file descriptor to it read-only with `LO_FLAGS_AUTOCLEAR`,
//! so the device detaches by itself when the last user (our fd, then the
//! mount) goes away: a crash at any point cannot leak a loop device. Binding
//! the very fd we hashed means the kernel mounts the bytes we verified.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A configured loop device; dropping it closes our reference (the device
/// then lives exactly as long as a mount uses it).
#[derive(Debug)]
pub struct LoopDevice {
    file: File,
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// The open device.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its device number (major, minor).
    pub fn number(&self) -> io::Result<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let rdev = self.file.metadata()?.rdev() as libc::dev_t;
        Ok((libc::major(rdev), libc::minor(rdev)))
    }
}

/// Binds `backing` read-only to a free loop device. `label` shows up in
/// `losetup -l` as the backing file name.
pub fn attach(backing: &File, label: &str) -> io::Result<LoopDevice> {
    let ctl = OpenOptions::new().read(true).write(true).open("/dev/loop-control").map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(e.kind(), "/dev/loop-control does not exist: the loop driver is not loaded")
        } else {
            e
        }
    })?;
    // Another process may take the free device between GET_FREE and CONFIGURE: retry.
    for _ in 0..20 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // udev has not created it yet
            Err(e) => return Err(e),
        };
        let mut name = [0u8; LO_NAME_SIZE];
        let bytes = label.as_bytes();
        name[..bytes.len().min(LO_NAME_SIZE - 1)].copy_from_slice(&bytes[..bytes.len().min(LO_NAME_SIZE - 1)]);
        let cfg = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                lo_file_name: name,
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: `cfg` is a fully initialised `struct loop_config` that lives
        // across the call; the kernel only reads it.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if rc == 0 {
            return Ok(LoopDevice { file: dev, path });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Err(io::Error::other("no free loop device after 20 attempts"))
}

/// The label a loop device was given by [`attach`] (`lo_file_name`).
pub fn label(device: &std::path::Path) -> io::Result<String> {
    let dev = File::open(device)?;
    // SAFETY: all-zero bytes are a valid `struct loop_info64` (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into `info`, which lives across the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.lo_file_name.iter().position(|&b| b == 0).unwrap_or(LO_NAME_SIZE);
    Ok(imgdeploy_common::text::printable(&String::from_utf8_lossy(&info.lo_file_name[..end])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_linux_loop_h() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
