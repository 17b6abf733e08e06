//! The few device-mapper ioctls a dm-verity device needs, issued on
//! `/dev/mapper/control` in-process: create, load a table, resume, status,
//! list, remove (deferred while open). Beside [`crate::loopdev`], the other
//! module of `imgdeploy` that contains `unsafe`.
//!
//! Why not the `devicemapper` crate: its 0.34 waits without a timeout for a
//! udev cookie on every resume and remove when udevd runs, which only the
//! rules of Debian's `dmsetup` package ever complete
//! (stratis-storage/devicemapper-rs#858): on a minimal Debian frontend an
//! apply would hang. It also needs libclang and libdevmapper headers to
//! build. We send no cookie, so nothing waits for udev; the kernel's
//! devtmpfs creates `/dev/dm-N` by itself, and that node is what we mount.
//!
//! The ABI is `<linux/dm-ioctl.h>` (interface version 4), stable since 2.6.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

const CONTROL: &str = "/dev/mapper/control";
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
const HEADER: usize = 312;
const SPEC: usize = 40;

// DM_READONLY_FLAG (1 << 0), DM_BUFFER_FULL_FLAG (1 << 8), DM_DEFERRED_REMOVE (1 << 17).
const READONLY: u32 = 0x1;
const BUFFER_FULL: u32 = 0x100;
const DEFERRED_REMOVE: u32 = 0x2_0000;

const LIST_DEVICES: u8 = 2;
const DEV_CREATE: u8 = 3;
const DEV_REMOVE: u8 = 4;
const DEV_SUSPEND: u8 = 6;
const DEV_STATUS: u8 = 7;
const TABLE_LOAD: u8 = 9;
const TABLE_STATUS: u8 = 12;

/// `struct dm_ioctl`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; NAME_LEN],
    uuid: [u8; UUID_LEN],
    data: [u8; 7],
}

const _: () = assert!(std::mem::size_of::<DmIoctl>() == HEADER);

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
const fn request(nr: u8) -> libc::c_ulong {
    const IOC_READ_WRITE: libc::c_ulong = 3;
    // The fields do not overlap, so adding them is or-ing them.
    (IOC_READ_WRITE << 30) + ((HEADER as libc::c_ulong) << 16) + (0xfd << 8) + nr as libc::c_ulong
}

/// What the kernel says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its name.
    pub name: String,
    /// Its uuid (empty when none was set).
    pub uuid: String,
    /// Its device number.
    pub dev: (u32, u32),
    /// How many openers it has (a mount counts as one).
    pub open_count: i32,
}

impl DeviceInfo {
    /// `/dev/dm-N`, which the kernel's devtmpfs creates without udev.
    pub fn node(&self) -> PathBuf {
        PathBuf::from(format!("/dev/dm-{}", self.dev.1))
    }
}

/// An open `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control(File);

fn put(field: &mut [u8], text: &str) -> io::Result<()> {
    if text.len() >= field.len() || text.as_bytes().contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("device-mapper name {text:?} is too long")));
    }
    field[..text.len()].copy_from_slice(text.as_bytes());
    Ok(())
}

fn text_of(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl Control {
    /// Opens the control device; `NotFound` when the kernel has no
    /// device-mapper (or it is not loaded).
    pub fn open() -> io::Result<Self> {
        OpenOptions::new().read(true).write(true).open(CONTROL).map(Control)
    }

    /// One ioctl with `payload` after the header, returning the header and
    /// the data the kernel wrote back (growing the buffer while it says
    /// the buffer was too small).
    fn call(
        &self,
        nr: u8,
        name: Option<&str>,
        uuid: Option<&str>,
        flags: u32,
        payload: &[u8],
    ) -> io::Result<(DmIoctl, Vec<u8>)> {
        let mut size = (HEADER + payload.len()).max(16 << 10);
        loop {
            // u64 words: the header and the target specs are 8-byte aligned.
            let mut buf = vec![0u64; size.div_ceil(8)];
            // SAFETY: `buf` is at least HEADER bytes, 8-byte aligned, and
            // DmIoctl is plain integers and byte arrays (any bytes are valid).
            let hdr = unsafe { &mut *(buf.as_mut_ptr() as *mut DmIoctl) };
            hdr.version = [4, 0, 0];
            hdr.data_size = (buf.len() * 8) as u32;
            hdr.data_start = HEADER as u32;
            hdr.flags = flags;
            hdr.target_count = u32::from(!payload.is_empty());
            if let Some(n) = name {
                put(&mut hdr.name, n)?;
            }
            if let Some(u) = uuid {
                put(&mut hdr.uuid, u)?;
            }
            // SAFETY: the payload fits behind the header (size covers both).
            let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, buf.len() * 8) };
            bytes[HEADER..HEADER + payload.len()].copy_from_slice(payload);
            // SAFETY: the kernel reads and writes at most data_size bytes of `buf`, which lives across the call.
            let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request(nr), buf.as_mut_ptr()) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above.
            let out = unsafe { *(buf.as_ptr() as *const DmIoctl) };
            if out.flags & BUFFER_FULL != 0 && size < 64 << 20 {
                size *= 4;
                continue;
            }
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, buf.len() * 8) };
            let (start, end) = (out.data_start as usize, (out.data_size as usize).min(bytes.len()));
            let data = if start < end { bytes[start..end].to_vec() } else { Vec::new() };
            return Ok((out, data));
        }
    }

    fn info(h: &DmIoctl) -> DeviceInfo {
        DeviceInfo {
            name: text_of(&h.name),
            uuid: text_of(&h.uuid),
            dev: (libc::major(h.dev as libc::dev_t), libc::minor(h.dev as libc::dev_t)),
            open_count: h.open_count,
        }
    }

    /// Creates a read-only device named `name` with `uuid` and the single
    /// target `target` (`params` as the kernel parses them) over `sectors`
    /// 512-byte sectors, and activates it. A device left half made is removed.
    pub fn create(&self, name: &str, uuid: &str, sectors: u64, target: &str, params: &str) -> io::Result<DeviceInfo> {
        self.call(DEV_CREATE, Some(name), Some(uuid), READONLY, &[])?;
        let made = (|| {
            self.call(TABLE_LOAD, Some(name), None, READONLY, &table(sectors, target, params)?)?;
            // Resume (no SUSPEND flag): the loaded table goes live.
            let (h, _) = self.call(DEV_SUSPEND, Some(name), None, 0, &[])?;
            Ok(Self::info(&h))
        })();
        if made.is_err() {
            let _ = self.remove(name, false);
        }
        made
    }

    /// The device's current state.
    pub fn status(&self, name: &str) -> io::Result<DeviceInfo> {
        self.call(DEV_STATUS, Some(name), None, 0, &[]).map(|(h, _)| Self::info(&h))
    }

    /// Each target's status line (`STATUSTYPE_INFO`; for verity `V` or `C`).
    pub fn target_status(&self, name: &str) -> io::Result<Vec<String>> {
        let (h, data) = self.call(TABLE_STATUS, Some(name), None, 0, &[])?;
        Ok(specs(&data, h.target_count))
    }

    /// Removes the device; with `deferred`, a device still open (mounted)
    /// is removed by the kernel when its last opener closes it.
    pub fn remove(&self, name: &str, deferred: bool) -> io::Result<()> {
        self.call(DEV_REMOVE, Some(name), None, if deferred { DEFERRED_REMOVE } else { 0 }, &[]).map(|_| ())
    }

    /// The names of every device-mapper device.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let (_, data) = self.call(LIST_DEVICES, None, None, 0, &[])?;
        Ok(names(&data))
    }
}

/// A one-target table as `DM_TABLE_LOAD` takes it: a `struct
/// dm_target_spec` (u64 sector_start, u64 length, i32 status, u32 next,
/// char target_type[16]) covering sectors 0..`sectors`, then the
/// parameters as a C string, padded to 8 bytes; `next` is the padded size.
fn table(sectors: u64, target: &str, params: &str) -> io::Result<Vec<u8>> {
    let mut spec = vec![0u8; SPEC];
    spec[8..16].copy_from_slice(&sectors.to_ne_bytes());
    put(&mut spec[24..40], target)?;
    spec.extend_from_slice(params.as_bytes());
    spec.push(0);
    spec.resize(spec.len().next_multiple_of(8), 0);
    let next = spec.len() as u32;
    spec[20..24].copy_from_slice(&next.to_ne_bytes());
    Ok(spec)
}

/// Parses a `struct dm_name_list` chain: u64 dev, u32 next (offset to the
/// next entry, 0 at the last), then the name. A first dev of 0: no devices.
fn names(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    // Each step moves past at least an entry's header (or stops), so no
    // `next` the kernel could send makes this loop forever.
    let mut entry = data;
    while entry.len() > 12 {
        let (header, body) = entry.split_at(12);
        let dev = u64::from_ne_bytes(header[0..8].try_into().expect("8 bytes"));
        let next = u32::from_ne_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        if dev == 0 && out.is_empty() && next == 0 {
            break;
        }
        out.push(text_of(body));
        // `next` counts from the start of this entry; 0 ends the list.
        entry = match next.checked_sub(12).and_then(|skip| body.get(skip..)) {
            Some(rest) => rest,
            None => break,
        };
    }
    out
}

/// Parses `count` target specs, each followed by its text; `next` is an
/// offset from the start of the data.
fn specs(data: &[u8], count: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + SPEC > data.len() {
            break;
        }
        out.push(text_of(&data[at + SPEC..]));
        let next = u32::from_ne_bytes(data[at + 20..at + 24].try_into().expect("4 bytes")) as usize;
        if next <= at {
            break;
        }
        at = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_codes_match_the_kernel_header() {
        // DM_DEV_CREATE and DM_TABLE_LOAD as <linux/dm-ioctl.h> defines them on x86_64.
        assert_eq!(request(DEV_CREATE), 0xc138_fd03);
        assert_eq!(request(TABLE_LOAD), 0xc138_fd09);
        assert_eq!(request(DEV_REMOVE), 0xc138_fd04);
    }

    #[test]
    fn name_lists_parse() {
        assert!(names(&[0u8; 16]).is_empty());
        let mut d = Vec::new();
        d.extend_from_slice(&((253u64 << 8) | 1).to_ne_bytes());
        d.extend_from_slice(&24u32.to_ne_bytes());
        d.extend_from_slice(b"one\0\0\0\0\0\0\0\0\0");
        d.extend_from_slice(&((253u64 << 8) | 2).to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(b"two\0");
        assert_eq!(names(&d), ["one", "two"]);
        assert_eq!(names(&d[..36]), ["one"], "an entry cut after its header is not read");
        assert_eq!(names(&d[..37]), ["one", "t"]);
        assert_eq!(names(&d[24..]), ["two"], "one device, the last entry");
        let mut past_the_end = d.clone();
        past_the_end[8..12].copy_from_slice(&100u32.to_ne_bytes());
        assert_eq!(names(&past_the_end), ["one"], "a next past the reply ends it");
    }

    #[test]
    fn a_device_is_mounted_through_its_dev_node() {
        let info = DeviceInfo { name: "x".into(), uuid: String::new(), dev: (253, 4), open_count: 0 };
        assert_eq!(info.node(), PathBuf::from("/dev/dm-4"));
    }

    /// The table bytes, field by field, and what `specs` reads back from a
    /// status reply laid out the same way.
    #[test]
    fn a_table_is_one_spec_and_its_parameters() {
        let t = table(16, "verity", "1 /dev/loop0").unwrap();
        assert_eq!(t.len(), 40 + 16, "40-byte spec, 13 bytes of text padded to 16");
        assert_eq!(&t[0..8], &0u64.to_ne_bytes(), "starts at sector 0");
        assert_eq!(&t[8..16], &16u64.to_ne_bytes(), "length in sectors");
        assert_eq!(&t[16..20], &[0; 4], "status");
        assert_eq!(&t[20..24], &56u32.to_ne_bytes(), "next: the padded size");
        assert_eq!(&t[24..40], b"verity\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(&t[40..], b"1 /dev/loop0\0\0\0\0");
        assert_eq!(table(1, "linear", "1234567").unwrap().len(), 48, "7 bytes and a NUL fill 8");
        assert!(table(1, "a-target-name-16", "").is_err(), "16 bytes leave no room for the NUL");
        assert_eq!(specs(&t, 1), ["1 /dev/loop0"]);
        assert_eq!(specs(&t[..40], 1), [""], "a spec whose text is cut off reads as empty");
        assert!(specs(&t[..39], 1).is_empty(), "a spec cut short is not read");
    }

    #[test]
    fn status_replies_parse() {
        let mut two = table(8, "verity", "V").unwrap();
        let first = two.len() as u32;
        two.extend(table(8, "verity", "C").unwrap());
        // In a reply, `next` counts from the start of the data.
        two[first as usize + 20..first as usize + 24].copy_from_slice(&(2 * first).to_ne_bytes());
        assert_eq!(specs(&two, 2), ["V", "C"]);
        assert_eq!(specs(&two, 1), ["V"], "no more than the count");
        assert!(specs(&two, 0).is_empty());
        assert_eq!(specs(&two[..first as usize + 39], 2), ["V"], "a spec cut short is not read");
        // A `next` that does not move forward ends the list instead of looping.
        let mut looped = two.clone();
        looped[20..24].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(specs(&looped, 2), ["V"]);
    }

    #[test]
    fn texts_end_at_the_first_nul_or_the_field() {
        assert_eq!(text_of(b"abc\0def"), "abc");
        assert_eq!(text_of(b"abc"), "abc");
        assert_eq!(text_of(b""), "");
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        let mut f = [0u8; 8];
        assert!(put(&mut f, "1234567").is_ok());
        assert!(put(&mut f, "12345678").is_err());
        assert!(put(&mut f, "a\0b").is_err());
    }
}
