//! Safe wrapper over libsquashfs (squashfs-tools-ng 1.2, Debian's
//! `libsquashfs-dev`), the one module of `imgbuild` that contains `unsafe`.
//!
//! Why bind libsquashfs instead of using a crate: the `squashfs-ng` 0.1.4
//! writer mis-encodes device minors above 255, gives every hardlink its own
//! nlink 1, writes parent inode 0 (no `..`), miscounts directory nlink,
//! hard-codes zstd level 15 and the current time, and emits xattrs in
//! HashMap order; `backhand` drops xattrs, splits hardlinks and compresses on
//! one thread. libsquashfs itself is sound, multi-threaded and lean, so we use
//! its block processor, meta writers, directory writer and tables directly
//! and take every decision about inodes (numbers, nlink, parents, devices,
//! ordering, timestamps) ourselves in [`crate::image`].
//!
//! The blocks themselves are not compressed by libsquashfs's zstd (Debian's
//! libzstd) but by a compressor object of ours that libsquashfs calls for
//! every data, fragment and metadata block ([`BlockPacker`]), so that the
//! bytes come from [`imgdeploy_common::compress`], the same code a deployer
//! recompresses with, and an earlier image's block can be reused instead.
//!
//! The declarations below mirror `/usr/include/sqfs/*.h` of 1.2.0 by hand
//! (only what we call); `tests::layouts` pins the struct sizes the C headers
//! give, and the round-trip tests mount every image with the kernel.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::{self, NonNull};

/// A libsquashfs error code with the operation that returned it.
#[derive(Debug, thiserror::Error)]
#[error("libsquashfs failed while {what}: {}", describe(*.code))]
pub struct SqfsError {
    /// What we were doing.
    pub what: &'static str,
    /// The negative `SQFS_ERROR` code (0 for a NULL return).
    pub code: i32,
}

fn describe(code: i32) -> &'static str {
    match code {
        0 => "out of memory or could not create the object",
        -1 => "out of memory",
        -2 => "input/output error (is the disk full?)",
        -3 => "compressor error",
        -4 => "internal error",
        -5 => "corrupted data",
        -6 => "unsupported feature",
        -7 => "numeric overflow (the tree is too large for squashfs)",
        -8 => "out of bounds",
        -16 => "invalid argument",
        -17 => "call sequence error",
        _ => "unknown error",
    }
}

fn check(code: c_int, what: &'static str) -> Result<(), SqfsError> {
    if code == 0 {
        Ok(())
    } else {
        Err(SqfsError { what, code })
    }
}

fn nonnull<T>(p: *mut T, what: &'static str) -> Result<NonNull<T>, SqfsError> {
    NonNull::new(p).ok_or(SqfsError { what, code: 0 })
}

mod ffi {
    use super::*;

    #[repr(C)]
    pub struct Object {
        pub destroy: unsafe extern "C" fn(*mut Object),
        pub copy: Option<unsafe extern "C" fn(*const Object) -> *mut Object>,
    }

    #[repr(C)]
    pub struct File {
        pub base: Object,
        pub read_at: unsafe extern "C" fn(*mut File, u64, *mut c_void, usize) -> c_int,
        pub write_at: unsafe extern "C" fn(*mut File, u64, *const c_void, usize) -> c_int,
        pub get_size: unsafe extern "C" fn(*const File) -> u64,
        pub truncate: unsafe extern "C" fn(*mut File, u64) -> c_int,
    }

    #[repr(C)]
    pub struct Compressor {
        pub base: Object,
        pub get_configuration: unsafe extern "C" fn(*const Compressor, *mut CompressorConfig),
        pub write_options: unsafe extern "C" fn(*mut Compressor, *mut File) -> c_int,
        pub read_options: unsafe extern "C" fn(*mut Compressor, *mut File) -> c_int,
        pub do_block: unsafe extern "C" fn(*mut Compressor, *const u8, u32, *mut u8, u32) -> i32,
    }

    #[repr(C)]
    pub struct BlockWriter {
        pub base: Object,
        pub write_data_block:
            unsafe extern "C" fn(*mut BlockWriter, *mut c_void, u32, u32, u32, *const u8, *mut u64) -> c_int,
        pub get_block_count: unsafe extern "C" fn(*const BlockWriter) -> u64,
    }

    #[repr(C)]
    pub struct CompressorConfig {
        pub id: u16,
        pub flags: u16,
        pub block_size: u32,
        pub level: u32,
        pub opt: [u64; 2],
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct Super {
        pub magic: u32,
        pub inode_count: u32,
        pub modification_time: u32,
        pub block_size: u32,
        pub fragment_entry_count: u32,
        pub compression_id: u16,
        pub block_log: u16,
        pub flags: u16,
        pub id_count: u16,
        pub version_major: u16,
        pub version_minor: u16,
        pub root_inode_ref: u64,
        pub bytes_used: u64,
        pub id_table_start: u64,
        pub xattr_id_table_start: u64,
        pub inode_table_start: u64,
        pub directory_table_start: u64,
        pub fragment_table_start: u64,
        pub export_table_start: u64,
    }

    #[repr(C)]
    pub struct BlockProcessorDesc {
        pub size: u32,
        pub max_block_size: u32,
        pub num_workers: u32,
        pub max_backlog: u32,
        pub cmp: *mut Compressor,
        pub wr: *mut c_void,
        pub tbl: *mut c_void,
        pub file: *mut File,
        pub uncmp: *mut Compressor,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct InodeBase {
        pub type_: u16,
        pub mode: u16,
        pub uid_idx: u16,
        pub gid_idx: u16,
        pub mod_time: u32,
        pub inode_number: u32,
    }

    /// `sqfs_inode_generic_t` without the flexible `extra[]` tail; the union
    /// is laid out as 40 bytes (the largest member, `file_ext`).
    #[repr(C)]
    pub struct InodeGeneric {
        pub base: InodeBase,
        pub payload_bytes_available: u32,
        pub payload_bytes_used: u32,
        pub data: [u32; 10],
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct Fragment {
        pub start_offset: u64,
        pub size: u32,
        pub pad0: u32,
    }

    pub const SQFS_COMP_ZSTD: c_uint = 6;
    pub const SQFS_ERROR_COMPRESSOR: i32 = -3;
    pub const SQFS_INODE_EXT_FILE: u16 = 9;
    pub const SQFS_FILE_OPEN_NO_CHARSET_XFRM: u32 = 0x04;
    pub const SQFS_META_WRITER_KEEP_IN_MEMORY: u32 = 0x01;
    pub const SQFS_FLAG_COMPRESSOR_OPTIONS: u16 = 0x0400;
    pub const SQFS_BLK_DONT_FRAGMENT: u32 = 0x0004;
    pub const SQFS_BLK_ALIGN: u32 = 0x0002;
    pub const SQFS_BLK_FIRST_BLOCK: u32 = 0x0800;

    pub const SQFS_INODE_DIR: u16 = 1;
    pub const SQFS_INODE_FILE: u16 = 2;
    pub const SQFS_INODE_SLINK: u16 = 3;
    pub const SQFS_INODE_BDEV: u16 = 4;
    pub const SQFS_INODE_CDEV: u16 = 5;
    pub const SQFS_INODE_FIFO: u16 = 6;
    pub const SQFS_INODE_SOCKET: u16 = 7;

    #[link(name = "squashfs")]
    extern "C" {
        pub fn sqfs_open_file(filename: *const c_char, flags: u32) -> *mut File;
        pub fn sqfs_compressor_config_init(
            cfg: *mut CompressorConfig,
            id: c_uint,
            block_size: usize,
            flags: u16,
        ) -> c_int;
        pub fn sqfs_compressor_create(cfg: *const CompressorConfig, out: *mut *mut Compressor) -> c_int;
        pub fn sqfs_super_init(sup: *mut Super, block_size: usize, mtime: u32, comp: c_uint) -> c_int;
        pub fn sqfs_super_write(sup: *const Super, file: *mut File) -> c_int;
        pub fn sqfs_block_writer_create(file: *mut File, devblksz: usize, flags: u32) -> *mut c_void;
        pub fn sqfs_frag_table_create(flags: u32) -> *mut c_void;
        pub fn sqfs_frag_table_write(tbl: *mut c_void, file: *mut File, sup: *mut Super, cmp: *mut Compressor)
            -> c_int;
        pub fn sqfs_frag_table_lookup(tbl: *mut c_void, index: u32, out: *mut Fragment) -> c_int;
        pub fn sqfs_frag_table_get_size(tbl: *mut c_void) -> usize;
        pub fn sqfs_block_processor_create_ex(desc: *const BlockProcessorDesc, out: *mut *mut c_void) -> c_int;
        pub fn sqfs_block_processor_begin_file(
            proc_: *mut c_void,
            inode: *mut *mut InodeGeneric,
            user: *mut c_void,
            flags: u32,
        ) -> c_int;
        pub fn sqfs_block_processor_append(proc_: *mut c_void, data: *const c_void, size: usize) -> c_int;
        pub fn sqfs_block_processor_end_file(proc_: *mut c_void) -> c_int;
        pub fn sqfs_block_processor_finish(proc_: *mut c_void) -> c_int;
        pub fn sqfs_id_table_create(flags: u32) -> *mut c_void;
        pub fn sqfs_id_table_id_to_index(tbl: *mut c_void, id: u32, out: *mut u16) -> c_int;
        pub fn sqfs_id_table_write(tbl: *mut c_void, file: *mut File, sup: *mut Super, cmp: *mut Compressor) -> c_int;
        pub fn sqfs_xattr_writer_create(flags: u32) -> *mut c_void;
        pub fn sqfs_xattr_writer_begin(xwr: *mut c_void, flags: u32) -> c_int;
        pub fn sqfs_xattr_writer_add(xwr: *mut c_void, key: *const c_char, value: *const c_void, size: usize) -> c_int;
        pub fn sqfs_xattr_writer_end(xwr: *mut c_void, out: *mut u32) -> c_int;
        pub fn sqfs_xattr_writer_flush(
            xwr: *const c_void,
            file: *mut File,
            sup: *mut Super,
            cmp: *mut Compressor,
        ) -> c_int;
        pub fn sqfs_meta_writer_create(file: *mut File, cmp: *mut Compressor, flags: u32) -> *mut c_void;
        pub fn sqfs_meta_writer_flush(m: *mut c_void) -> c_int;
        pub fn sqfs_meta_writer_get_position(m: *const c_void, block_start: *mut u64, offset: *mut u32);
        pub fn sqfs_meta_write_write_to_file(m: *mut c_void) -> c_int;
        pub fn sqfs_meta_writer_write_inode(m: *mut c_void, n: *const InodeGeneric) -> c_int;
        pub fn sqfs_dir_writer_create(dm: *mut c_void, flags: u32) -> *mut c_void;
        pub fn sqfs_dir_writer_begin(w: *mut c_void, flags: u32) -> c_int;
        pub fn sqfs_dir_writer_add_entry(
            w: *mut c_void,
            name: *const c_char,
            inode_num: u32,
            inode_ref: u64,
            mode: u16,
        ) -> c_int;
        pub fn sqfs_dir_writer_end(w: *mut c_void) -> c_int;
        pub fn sqfs_dir_writer_create_inode(
            w: *const c_void,
            hlinks: usize,
            xattr: u32,
            parent_ino: u32,
        ) -> *mut InodeGeneric;
        pub fn sqfs_inode_make_extended(inode: *mut InodeGeneric) -> c_int;
        pub fn sqfs_inode_set_xattr_index(inode: *mut InodeGeneric, index: u32) -> c_int;
        pub fn sqfs_free(ptr: *mut c_void);
    }
}

/// Destroys any libsquashfs object through its embedded `destroy` pointer.
///
/// SAFETY: `obj` must be a live object created by libsquashfs, whose first
/// member is `sqfs_object_t`, and must not be used afterwards.
unsafe fn destroy(obj: *mut c_void) {
    if !obj.is_null() {
        let o = obj as *mut ffi::Object;
        ((*o).destroy)(o);
    }
}

/// What compresses the blocks libsquashfs hands over: one value per worker
/// thread, each made by [`BlockPacker::fork`] of the first.
pub trait BlockPacker: Send {
    /// Packs `input` into `out` (which holds at least `input.len() - 1`
    /// bytes), or says it is to be stored as it is.
    fn pack(&mut self, input: &[u8], out: &mut [u8]) -> std::io::Result<imgdeploy_common::compress::Packed>;
    /// Another packer for another thread, sharing whatever state this one shares.
    fn fork(&self) -> std::io::Result<Box<dyn BlockPacker>>;
    /// The packer of metadata blocks (the inode, directory, fragment, id
    /// and xattr tables), which may compress at another level.
    fn for_metadata(&self) -> std::io::Result<Box<dyn BlockPacker>>;
}

/// A `sqfs_compressor_t` whose blocks go through a [`BlockPacker`]. The
/// options block (written once, at the start of the image) comes from
/// libsquashfs's own zstd compressor of the same level, which it borrows.
#[repr(C)]
struct OwnCompressor {
    base: ffi::Compressor,
    options: *mut ffi::Compressor,
    packer: Box<dyn BlockPacker>,
}

impl OwnCompressor {
    fn boxed(options: *mut ffi::Compressor, packer: Box<dyn BlockPacker>) -> *mut ffi::Compressor {
        let this = Box::new(OwnCompressor {
            base: ffi::Compressor {
                base: ffi::Object { destroy: own_destroy, copy: Some(own_copy) },
                get_configuration: own_get_configuration,
                write_options: own_write_options,
                read_options: own_read_options,
                do_block: own_do_block,
            },
            options,
            packer,
        });
        Box::into_raw(this).cast()
    }
}

/// SAFETY (all `own_*`): libsquashfs calls these only with a pointer
/// returned by [`OwnCompressor::boxed`] or `own_copy`, which is an
/// `OwnCompressor` (its first member is the `sqfs_compressor_t`), and with
/// buffers valid for the sizes it passes. `options` outlives every copy.
unsafe extern "C" fn own_destroy(obj: *mut ffi::Object) {
    drop(Box::from_raw(obj.cast::<OwnCompressor>()));
}

unsafe extern "C" fn own_copy(obj: *const ffi::Object) -> *mut ffi::Object {
    let this = &*obj.cast::<OwnCompressor>();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.packer.fork())) {
        Ok(Ok(packer)) => OwnCompressor::boxed(this.options, packer).cast(),
        _ => ptr::null_mut(),
    }
}

unsafe extern "C" fn own_get_configuration(cmp: *const ffi::Compressor, cfg: *mut ffi::CompressorConfig) {
    let this = &*cmp.cast::<OwnCompressor>();
    ((*this.options).get_configuration)(this.options, cfg)
}

unsafe extern "C" fn own_write_options(cmp: *mut ffi::Compressor, file: *mut ffi::File) -> c_int {
    let this = &*cmp.cast::<OwnCompressor>();
    ((*this.options).write_options)(this.options, file)
}

unsafe extern "C" fn own_read_options(cmp: *mut ffi::Compressor, file: *mut ffi::File) -> c_int {
    let this = &*cmp.cast::<OwnCompressor>();
    ((*this.options).read_options)(this.options, file)
}

unsafe extern "C" fn own_do_block(
    cmp: *mut ffi::Compressor,
    input: *const u8,
    size: u32,
    out: *mut u8,
    outsize: u32,
) -> i32 {
    use imgdeploy_common::compress::Packed;
    let this = &mut *cmp.cast::<OwnCompressor>();
    if size == 0 || size >= i32::MAX as u32 {
        return ffi::SQFS_ERROR_COMPRESSOR;
    }
    let input = std::slice::from_raw_parts(input, size as usize);
    let out = std::slice::from_raw_parts_mut(out, outsize as usize);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.packer.pack(input, out))) {
        Ok(Ok(Packed::Compressed(n))) if n < size as usize => n as i32,
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            tracing::error!("compressing a block of {size} bytes: {e}");
            ffi::SQFS_ERROR_COMPRESSOR
        }
        Err(_) => ffi::SQFS_ERROR_COMPRESSOR,
    }
}

/// The alignment of a file's first block when it asks for one.
const ALIGN: u64 = 4096;

/// A `sqfs_block_writer_t` in front of libsquashfs's own, which aligns the
/// first block of every file that asks for it (`SQFS_BLK_ALIGN`) to a
/// 4 KiB boundary of the image. libsquashfs 1.2.0's own alignment pads by
/// the remainder instead of up to the boundary (and also pads fragment
/// blocks), so the flag never reaches it. Deduplication stays its job: it
/// notes the file's start after our padding and truncates back to it.
#[repr(C)]
struct AligningWriter {
    base: ffi::BlockWriter,
    inner: *mut ffi::BlockWriter,
    file: *mut ffi::File,
}

impl AligningWriter {
    fn boxed(inner: *mut c_void, file: *mut ffi::File) -> *mut c_void {
        let this = Box::new(AligningWriter {
            base: ffi::BlockWriter {
                base: ffi::Object { destroy: aligning_destroy, copy: None },
                write_data_block: aligning_write,
                get_block_count: aligning_count,
            },
            inner: inner.cast(),
            file,
        });
        Box::into_raw(this).cast()
    }
}

/// SAFETY (all `aligning_*`): libsquashfs calls these only with the pointer
/// [`AligningWriter::boxed`] returned; `inner` is a live block writer it
/// owns and `file` outlives it.
unsafe extern "C" fn aligning_destroy(obj: *mut ffi::Object) {
    let this = Box::from_raw(obj.cast::<AligningWriter>());
    destroy(this.inner.cast());
}

unsafe extern "C" fn aligning_count(wr: *const ffi::BlockWriter) -> u64 {
    let this = &*wr.cast::<AligningWriter>();
    ((*this.inner).get_block_count)(this.inner)
}

unsafe extern "C" fn aligning_write(
    wr: *mut ffi::BlockWriter,
    user: *mut c_void,
    size: u32,
    checksum: u32,
    flags: u32,
    data: *const u8,
    location: *mut u64,
) -> c_int {
    let this = &mut *wr.cast::<AligningWriter>();
    if flags & ffi::SQFS_BLK_FIRST_BLOCK != 0 && flags & ffi::SQFS_BLK_ALIGN != 0 {
        let end = ((*this.file).get_size)(this.file);
        let pad = end.next_multiple_of(ALIGN) - end;
        if pad > 0 {
            let zeros = [0u8; ALIGN as usize];
            let rc = ((*this.file).write_at)(this.file, end, zeros.as_ptr().cast(), pad as usize);
            if rc != 0 {
                return rc;
            }
        }
    }
    ((*this.inner).write_data_block)(this.inner, user, size, checksum, flags & !ffi::SQFS_BLK_ALIGN, data, location)
}

/// Where a file's data went, read from its finished inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    /// Offset of its first data block.
    pub blocks_start: u64,
    /// File size.
    pub size: u64,
    /// The squashfs size word of each full block (bit 24: stored; 0: sparse).
    pub block_sizes: Vec<u32>,
    /// Fragment index and offset of its tail, if it has one in a fragment block.
    pub fragment: Option<(u32, u32)>,
}

/// A fragment block's location and squashfs size word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentBlock {
    /// Offset in the image.
    pub offset: u64,
    /// Size word (bit 24: stored).
    pub size: u32,
}

/// Where the tables of a finished image are (from its superblock).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tables {
    /// Start of the inode table (the end of the data area).
    pub inode_table_start: u64,
    /// Start of the fragment table's location array (u64::MAX: none).
    pub fragment_table_start: u64,
    /// Fragment table entries.
    pub fragment_entry_count: u32,
    /// Start of the id table's location array.
    pub id_table_start: u64,
    /// Id table entries.
    pub id_count: u16,
    /// Start of the xattr id table header (u64::MAX: none).
    pub xattr_id_table_start: u64,
    /// End of the filesystem (before the padding).
    pub bytes_used: u64,
}

/// An inode under construction, owned by us (freed with `sqfs_free`).
pub struct Inode {
    ptr: NonNull<ffi::InodeGeneric>,
}

// SAFETY: an Inode is a plain heap allocation owned by exactly one value.
unsafe impl Send for Inode {}

impl Drop for Inode {
    fn drop(&mut self) {
        // SAFETY: allocated by libsquashfs (malloc) or by `Inode::alloc` (calloc).
        unsafe { ffi::sqfs_free(self.ptr.as_ptr().cast()) }
    }
}

/// The kinds of inode that carry no file data.
pub enum Special<'a> {
    /// A symlink with this target.
    Symlink(&'a [u8]),
    /// A block device with this squashfs-encoded device number.
    BlockDev(u32),
    /// A character device.
    CharDev(u32),
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl Inode {
    fn alloc(extra: usize) -> Result<Self, SqfsError> {
        let size = std::mem::size_of::<ffi::InodeGeneric>() + extra;
        // SAFETY: calloc returns zeroed memory (or NULL), suitable for the C
        // struct; libsquashfs frees inodes with free(), as does our Drop.
        let p = unsafe { libc::calloc(1, size) } as *mut ffi::InodeGeneric;
        let ptr = nonnull(p, "allocating an inode")?;
        // SAFETY: freshly allocated, large enough, exclusively ours.
        unsafe {
            (*ptr.as_ptr()).payload_bytes_available = extra as u32;
            (*ptr.as_ptr()).payload_bytes_used = extra as u32;
        }
        Ok(Self { ptr })
    }

    /// A data-less inode with link count `nlink`.
    pub fn special(kind: Special<'_>, nlink: u32) -> Result<Self, SqfsError> {
        let extra = match kind {
            Special::Symlink(t) => t.len(),
            _ => 0,
        };
        let inode = Self::alloc(extra)?;
        let p = inode.ptr.as_ptr();
        // SAFETY: `p` is our zeroed allocation with `extra` bytes after the
        // struct; the `data` words follow the C union's member layouts
        // (dev: nlink, devno; ipc: nlink; slink: nlink, target_size).
        unsafe {
            let (ty, second) = match kind {
                Special::Symlink(t) => {
                    let dst = (p as *mut u8).add(std::mem::size_of::<ffi::InodeGeneric>());
                    ptr::copy_nonoverlapping(t.as_ptr(), dst, t.len());
                    (ffi::SQFS_INODE_SLINK, Some(t.len() as u32))
                }
                Special::BlockDev(d) => (ffi::SQFS_INODE_BDEV, Some(d)),
                Special::CharDev(d) => (ffi::SQFS_INODE_CDEV, Some(d)),
                Special::Fifo => (ffi::SQFS_INODE_FIFO, None),
                Special::Socket => (ffi::SQFS_INODE_SOCKET, None),
            };
            (*p).base.type_ = ty;
            (*p).data[0] = nlink;
            if let Some(v) = second {
                (*p).data[1] = v;
            }
        }
        Ok(inode)
    }

    /// The data layout of a regular file's inode (None for other inodes).
    pub fn file_layout(&self) -> Option<FileLayout> {
        let p = self.ptr.as_ptr();
        // SAFETY: we own the inode; FILE is blocks_start, fragment_index,
        // fragment_offset, file_size (u32 each); EXT_FILE is blocks_start,
        // file_size, sparse (u64 each), nlink, fragment_idx, fragment_offset;
        // the block sizes follow the struct (`payload_bytes_used` bytes).
        unsafe {
            let d = &(*p).data;
            let wide = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
            let (blocks_start, size, frag_idx, frag_off) = match (*p).base.type_ {
                ffi::SQFS_INODE_FILE => (d[0] as u64, d[3] as u64, d[1], d[2]),
                ffi::SQFS_INODE_EXT_FILE => (wide(d[0], d[1]), wide(d[2], d[3]), d[7], d[8]),
                _ => return None,
            };
            let count = (*p).payload_bytes_used as usize / 4;
            let sizes = (p as *const u8).add(std::mem::size_of::<ffi::InodeGeneric>()).cast::<u32>();
            let block_sizes = (0..count).map(|i| sizes.add(i).read_unaligned()).collect();
            let fragment = (frag_idx != u32::MAX).then_some((frag_idx, frag_off));
            Some(FileLayout { blocks_start, size, block_sizes, fragment })
        }
    }

    /// Sets the fields every inode has.
    pub fn set_base(&mut self, mode: u16, uid_idx: u16, gid_idx: u16, mtime: u32, number: u32) {
        // SAFETY: we own the allocation.
        let b = unsafe { &mut (*self.ptr.as_ptr()).base };
        b.mode = mode;
        b.uid_idx = uid_idx;
        b.gid_idx = gid_idx;
        b.mod_time = mtime;
        b.inode_number = number;
    }

    /// Sets the link count of a regular file (promoting it to an extended
    /// inode when it is above 1, as the basic file inode has no nlink).
    pub fn set_file_nlink(&mut self, nlink: u32) -> Result<(), SqfsError> {
        let p = self.ptr.as_ptr();
        // SAFETY: we own the inode; for EXT_FILE the layout is
        // blocks_start(u64) file_size(u64) sparse(u64) nlink(u32) ... so nlink
        // is data word 6.
        unsafe {
            if (*p).base.type_ == ffi::SQFS_INODE_FILE {
                if nlink == 1 {
                    return Ok(());
                }
                check(ffi::sqfs_inode_make_extended(p), "making a file inode extended")?;
            }
            (*p).data[6] = nlink;
        }
        Ok(())
    }

    /// Sets a directory's link count (2 + number of subdirectories).
    pub fn set_dir_nlink(&mut self, nlink: u32) {
        let p = self.ptr.as_ptr();
        // SAFETY: we own the inode; DIR has nlink in word 1, EXT_DIR in word 0.
        unsafe {
            if (*p).base.type_ == ffi::SQFS_INODE_DIR {
                (*p).data[1] = nlink;
            } else {
                (*p).data[0] = nlink;
            }
        }
    }

    /// Attaches an xattr set (index from [`ImageWriter::xattrs`]).
    pub fn set_xattr(&mut self, index: Option<u32>) -> Result<(), SqfsError> {
        let Some(index) = index else { return Ok(()) };
        // SAFETY: we own the inode; the library grows it to an extended type.
        check(unsafe { ffi::sqfs_inode_set_xattr_index(self.ptr.as_ptr(), index) }, "setting an xattr index")
    }
}

/// Options of one image.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// zstd level 1..=22.
    pub level: u32,
    /// Data block size.
    pub block_size: u32,
    /// Compression threads.
    pub workers: u32,
    /// Superblock modification time.
    pub mtime: u32,
}

/// Every libsquashfs object needed to write one image, destroyed together.
pub struct ImageWriter {
    file: *mut ffi::File,
    /// libsquashfs's zstd compressor, used only for the options block.
    options_cmp: *mut ffi::Compressor,
    /// Ours ([`OwnCompressor`]): every data and fragment block goes through it.
    cmp: *mut ffi::Compressor,
    /// Ours too, for every metadata block ([`BlockPacker::for_metadata`]).
    meta_cmp: *mut ffi::Compressor,
    blkwr: *mut c_void,
    fragtbl: *mut c_void,
    proc_: *mut c_void,
    idtbl: *mut c_void,
    xwr: *mut c_void,
    im: *mut c_void,
    dm: *mut c_void,
    dirwr: *mut c_void,
    sup: ffi::Super,
    /// Stable homes for the inode pointers the block processor keeps updating
    /// until `finish_data`; boxed so pushing does not move them (the
    /// processor holds a pointer to the slot itself, not to the Vec).
    #[allow(clippy::vec_box)]
    file_slots: Vec<Box<*mut ffi::InodeGeneric>>,
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        // SAFETY: every pointer is NULL or a live object we created; the
        // processor goes first because it uses the writer, table and compressor.
        unsafe {
            for obj in [self.dirwr, self.dm, self.im, self.xwr, self.idtbl, self.proc_, self.fragtbl, self.blkwr] {
                destroy(obj);
            }
            destroy(self.cmp.cast());
            destroy(self.meta_cmp.cast());
            destroy(self.options_cmp.cast());
            destroy(self.file.cast());
            for slot in &self.file_slots {
                if !slot.is_null() {
                    ffi::sqfs_free((**slot).cast());
                }
            }
        }
    }
}

/// A handle to a file written through [`ImageWriter::begin_file`].
#[derive(Clone, Copy, Debug)]
pub struct FileSlot(usize);

impl ImageWriter {
    /// Creates `path` (which must not exist) and prepares to write an image.
    pub fn create(path: &Path, opts: &WriterOptions, packer: Box<dyn BlockPacker>) -> Result<Self, SqfsError> {
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| SqfsError { what: "naming the image file", code: -16 })?;
        let mut w = ImageWriter {
            file: ptr::null_mut(),
            options_cmp: ptr::null_mut(),
            cmp: ptr::null_mut(),
            meta_cmp: ptr::null_mut(),
            blkwr: ptr::null_mut(),
            fragtbl: ptr::null_mut(),
            proc_: ptr::null_mut(),
            idtbl: ptr::null_mut(),
            xwr: ptr::null_mut(),
            im: ptr::null_mut(),
            dm: ptr::null_mut(),
            dirwr: ptr::null_mut(),
            sup: ffi::Super::default(),
            file_slots: Vec::new(),
        };
        // SAFETY: plain calls into the C API in the order its docs require;
        // each result is checked before it is used, and stored in `w` so Drop
        // frees it whatever fails later.
        unsafe {
            w.file = nonnull(
                ffi::sqfs_open_file(cpath.as_ptr(), ffi::SQFS_FILE_OPEN_NO_CHARSET_XFRM),
                "creating the image file",
            )?
            .as_ptr();
            let mut cfg: ffi::CompressorConfig = std::mem::zeroed();
            check(
                ffi::sqfs_compressor_config_init(&mut cfg, ffi::SQFS_COMP_ZSTD, opts.block_size as usize, 0),
                "configuring zstd",
            )?;
            cfg.level = opts.level;
            check(ffi::sqfs_compressor_create(&cfg, &mut w.options_cmp), "creating the zstd compressor")?;
            let metadata_packer =
                packer.for_metadata().map_err(|_| SqfsError { what: "creating the metadata compressor", code: 0 })?;
            w.meta_cmp = OwnCompressor::boxed(w.options_cmp, metadata_packer);
            w.cmp = OwnCompressor::boxed(w.options_cmp, packer);
            check(
                ffi::sqfs_super_init(&mut w.sup, opts.block_size as usize, opts.mtime, ffi::SQFS_COMP_ZSTD),
                "initialising the superblock",
            )?;
            check(ffi::sqfs_super_write(&w.sup, w.file), "writing the superblock")?;
            let n = ((*w.cmp).write_options)(w.cmp, w.file);
            if n < 0 {
                return Err(SqfsError { what: "writing compressor options", code: n });
            }
            if n > 0 {
                w.sup.flags |= ffi::SQFS_FLAG_COMPRESSOR_OPTIONS;
            }
            let inner = nonnull(ffi::sqfs_block_writer_create(w.file, 4096, 0), "creating the block writer")?;
            w.blkwr = AligningWriter::boxed(inner.as_ptr(), w.file);
            w.fragtbl = nonnull(ffi::sqfs_frag_table_create(0), "creating the fragment table")?.as_ptr();
            let desc = ffi::BlockProcessorDesc {
                size: std::mem::size_of::<ffi::BlockProcessorDesc>() as u32,
                max_block_size: opts.block_size,
                num_workers: opts.workers.max(1),
                max_backlog: opts.workers.max(1) * 8,
                cmp: w.cmp,
                wr: w.blkwr,
                tbl: w.fragtbl,
                file: ptr::null_mut(),
                uncmp: ptr::null_mut(),
            };
            check(ffi::sqfs_block_processor_create_ex(&desc, &mut w.proc_), "starting the compression threads")?;
            w.idtbl = nonnull(ffi::sqfs_id_table_create(0), "creating the id table")?.as_ptr();
            w.xwr = nonnull(ffi::sqfs_xattr_writer_create(0), "creating the xattr writer")?.as_ptr();
            w.im = nonnull(ffi::sqfs_meta_writer_create(w.file, w.meta_cmp, 0), "creating the inode table writer")?
                .as_ptr();
            w.dm = nonnull(
                ffi::sqfs_meta_writer_create(w.file, w.meta_cmp, ffi::SQFS_META_WRITER_KEEP_IN_MEMORY),
                "creating the directory table writer",
            )?
            .as_ptr();
            w.dirwr = nonnull(ffi::sqfs_dir_writer_create(w.dm, 0), "creating the directory writer")?.as_ptr();
        }
        Ok(w)
    }

    /// Starts a regular file's data. With `own_tail`, the file's last partial
    /// block is stored as a block of its own instead of being packed into a
    /// shared fragment block. With `align`, its first block starts at a
    /// 4 KiB boundary of the image and zeros pad its last block to one.
    pub fn begin_file(&mut self, own_tail: bool, align: bool) -> Result<FileSlot, SqfsError> {
        let flags =
            if own_tail { ffi::SQFS_BLK_DONT_FRAGMENT } else { 0 } | if align { ffi::SQFS_BLK_ALIGN } else { 0 };
        self.file_slots.push(Box::new(ptr::null_mut()));
        let idx = self.file_slots.len() - 1;
        let slot: *mut *mut ffi::InodeGeneric = &mut *self.file_slots[idx];
        // SAFETY: the boxed slot outlives the processor's use of it (until
        // `finish_data`), as the Vec only moves the Box, not its contents.
        check(
            unsafe { ffi::sqfs_block_processor_begin_file(self.proc_, slot, ptr::null_mut(), flags) },
            "starting a file",
        )?;
        Ok(FileSlot(idx))
    }

    /// Appends data to the current file.
    pub fn append(&mut self, data: &[u8]) -> Result<(), SqfsError> {
        // SAFETY: `data` is valid for its length; the processor copies it.
        check(
            unsafe { ffi::sqfs_block_processor_append(self.proc_, data.as_ptr().cast(), data.len()) },
            "compressing file data",
        )
    }

    /// Ends the current file.
    pub fn end_file(&mut self) -> Result<(), SqfsError> {
        // SAFETY: plain call on our processor.
        check(unsafe { ffi::sqfs_block_processor_end_file(self.proc_) }, "finishing a file")
    }

    /// Waits for every data block and flushes the last fragment block. The
    /// inode table starts right after, and inode blocks reach the file as
    /// they fill, so its start is recorded now.
    pub fn finish_data(&mut self) -> Result<(), SqfsError> {
        // SAFETY: plain calls on our processor and file.
        unsafe {
            check(ffi::sqfs_block_processor_finish(self.proc_), "writing the remaining data blocks")?;
            self.sup.inode_table_start = ((*self.file).get_size)(self.file);
        }
        Ok(())
    }

    /// Every fragment block written, by fragment index. Call after `finish_data`.
    pub fn fragment_blocks(&mut self) -> Result<Vec<FragmentBlock>, SqfsError> {
        // SAFETY: plain calls on our fragment table.
        unsafe {
            let n = ffi::sqfs_frag_table_get_size(self.fragtbl);
            (0..n as u32)
                .map(|i| {
                    let mut f = ffi::Fragment::default();
                    check(ffi::sqfs_frag_table_lookup(self.fragtbl, i, &mut f), "reading the fragment table")?;
                    Ok(FragmentBlock { offset: f.start_offset, size: f.size })
                })
                .collect()
        }
    }

    /// Takes ownership of a file's finished inode. Call after `finish_data`.
    pub fn take_file_inode(&mut self, slot: FileSlot) -> Result<Inode, SqfsError> {
        let p = std::mem::replace(&mut *self.file_slots[slot.0], ptr::null_mut());
        Ok(Inode { ptr: nonnull(p, "taking a file inode")? })
    }

    /// The id table index of a uid or gid.
    pub fn id_index(&mut self, id: u32) -> Result<u16, SqfsError> {
        let mut out = 0u16;
        // SAFETY: plain call on our table.
        check(
            unsafe { ffi::sqfs_id_table_id_to_index(self.idtbl, id, &mut out) },
            "recording a uid/gid (more than 65536 distinct ids?)",
        )?;
        Ok(out)
    }

    /// Records an xattr set (keys must carry a `user.`, `trusted.` or
    /// `security.` prefix) and returns its index; `None` when empty.
    pub fn xattrs(&mut self, pairs: &[(CString, Vec<u8>)]) -> Result<Option<u32>, SqfsError> {
        if pairs.is_empty() {
            return Ok(None);
        }
        let mut out = 0u32;
        // SAFETY: plain calls; keys are NUL-terminated, values valid for their length.
        unsafe {
            check(ffi::sqfs_xattr_writer_begin(self.xwr, 0), "starting an xattr set")?;
            for (k, v) in pairs {
                check(ffi::sqfs_xattr_writer_add(self.xwr, k.as_ptr(), v.as_ptr().cast(), v.len()), "adding an xattr")?;
            }
            check(ffi::sqfs_xattr_writer_end(self.xwr, &mut out), "ending an xattr set")?;
        }
        Ok(Some(out))
    }

    /// Writes an inode into the inode table and returns its reference.
    pub fn write_inode(&mut self, inode: &Inode) -> Result<u64, SqfsError> {
        let (mut block, mut offset) = (0u64, 0u32);
        // SAFETY: plain calls on our meta writer with our inode.
        unsafe {
            ffi::sqfs_meta_writer_get_position(self.im, &mut block, &mut offset);
            check(ffi::sqfs_meta_writer_write_inode(self.im, inode.ptr.as_ptr()), "writing an inode")?;
        }
        Ok((block << 16) | offset as u64)
    }

    /// Writes one directory's entries (sorted by name bytes) and returns its
    /// inode, with `nlink` and `parent` set as given.
    pub fn write_dir(
        &mut self,
        entries: &[(CString, u32, u64, u16)],
        xattr: Option<u32>,
        nlink: u32,
        parent: u32,
    ) -> Result<Inode, SqfsError> {
        // SAFETY: plain calls on our directory writer; names are NUL-terminated.
        unsafe {
            check(ffi::sqfs_dir_writer_begin(self.dirwr, 0), "starting a directory")?;
            for (name, ino, iref, mode) in entries {
                check(
                    ffi::sqfs_dir_writer_add_entry(self.dirwr, name.as_ptr(), *ino, *iref, *mode),
                    "adding a directory entry",
                )?;
            }
            check(ffi::sqfs_dir_writer_end(self.dirwr), "ending a directory")?;
            let p = ffi::sqfs_dir_writer_create_inode(self.dirwr, 0, xattr.unwrap_or(u32::MAX), parent);
            let mut inode = Inode { ptr: nonnull(p, "creating a directory inode")? };
            inode.set_dir_nlink(nlink);
            Ok(inode)
        }
    }

    /// Writes the tables and the final superblock. The image is complete
    /// (padded to 4 KiB) when this returns.
    pub fn finalize(mut self, inode_count: u32, root_ref: u64) -> Result<(u64, Tables), SqfsError> {
        // SAFETY: plain calls in the order the format requires: inode table,
        // directory table, fragment table, id table, xattrs, superblock.
        unsafe {
            let size = |f: *mut ffi::File| ((*f).get_size)(f);
            self.sup.inode_count = inode_count;
            check(ffi::sqfs_meta_writer_flush(self.im), "flushing the inode table")?;
            check(ffi::sqfs_meta_writer_flush(self.dm), "flushing the directory table")?;
            self.sup.root_inode_ref = root_ref;
            self.sup.directory_table_start = size(self.file);
            check(ffi::sqfs_meta_write_write_to_file(self.dm), "writing the directory table")?;
            check(
                ffi::sqfs_frag_table_write(self.fragtbl, self.file, &mut self.sup, self.meta_cmp),
                "writing the fragment table",
            )?;
            check(
                ffi::sqfs_id_table_write(self.idtbl, self.file, &mut self.sup, self.meta_cmp),
                "writing the id table",
            )?;
            check(
                ffi::sqfs_xattr_writer_flush(self.xwr, self.file, &mut self.sup, self.meta_cmp),
                "writing the xattr table",
            )?;
            self.sup.bytes_used = size(self.file);
            check(ffi::sqfs_super_write(&self.sup, self.file), "writing the superblock")?;
            let pad = (4096 - self.sup.bytes_used % 4096) % 4096;
            if pad > 0 {
                let zeros = vec![0u8; pad as usize];
                check(
                    ((*self.file).write_at)(self.file, self.sup.bytes_used, zeros.as_ptr().cast(), zeros.len()),
                    "padding the image",
                )?;
            }
            let sup = &self.sup;
            let tables = Tables {
                inode_table_start: sup.inode_table_start,
                fragment_table_start: sup.fragment_table_start,
                fragment_entry_count: sup.fragment_entry_count,
                id_table_start: sup.id_table_start,
                id_count: sup.id_count,
                xattr_id_table_start: sup.xattr_id_table_start,
                bytes_used: sup.bytes_used,
            };
            Ok((self.sup.bytes_used + pad, tables))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes printed by a C program compiled against libsquashfs 1.2.0's headers.
    #[test]
    fn layouts() {
        use std::mem::size_of;
        assert_eq!(size_of::<ffi::Super>(), 96);
        assert_eq!(size_of::<ffi::InodeGeneric>(), 64);
        assert_eq!(size_of::<ffi::CompressorConfig>(), 32);
        assert_eq!(size_of::<ffi::BlockProcessorDesc>(), 56);
        assert_eq!(size_of::<ffi::File>(), 48);
        assert_eq!(size_of::<ffi::Compressor>(), 48);
        assert_eq!(size_of::<ffi::Fragment>(), 16);
    }
}
