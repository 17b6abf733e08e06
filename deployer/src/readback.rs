//! Reading back an image the deployer just wrote, to check it against its
//! signed hashes: what the page cache holds comes from there, the rest
//! straight from the disk (`O_DIRECT`), in requests as large as the reader's.
//!
//! Why: a static delta on XFS or btrfs writes most of the new image as
//! extents shared with the old one (reflinks), so none of those pages are
//! cached under the new file, while the bytes it patched are. Read through
//! the page cache, the shared part went through readahead a few hundred
//! KiB at a time: 0.9 s for 425 MB on a loop-mounted XFS, where a direct
//! read of the same bytes took 0.08 s. A direct read of what *is* cached
//! would go to the disk for nothing (and first write back what is dirty),
//! so each run of pages goes the way its residency (`mincore`) says. It
//! also leaves the web server's cache alone: the check does not fill the
//! page cache with an image nobody reads through this file.
//!
//! The bytes are the same either way (the kernel writes dirty pages back
//! before a direct read of them); only the path differs. Where direct reads
//! are not possible (a filesystem without `O_DIRECT`, an unaligned request)
//! everything is read through the cache.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::ptr::NonNull;

/// The unit of residency and of direct reads' alignment (offset, length
/// and buffer address).
const PAGE: usize = 4096;
/// The most one direct read asks for.
const MAX_DIRECT: usize = 8 << 20;

/// Reads `file`'s first `len` bytes in order ([`Read`]), each run of pages
/// from where it is: the page cache or the disk.
pub struct ReadBack {
    cached: File,
    direct: Option<File>,
    map: Option<Mapping>,
    bounce: Vec<u8>,
    pos: u64,
    len: u64,
    /// Bytes read through the page cache, and straight from the disk.
    pub stats: ReadStats,
}

/// How [`ReadBack`] read what it returned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadStats {
    /// Through the page cache.
    pub cached: u64,
    /// Straight from the disk.
    pub direct: u64,
}

impl ReadBack {
    /// A reader of `file`'s first `len` bytes, from the start. Falls back to
    /// reading everything through the cache when the file cannot be opened
    /// for direct reads or mapped to learn what is cached.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let cached = file.try_clone()?;
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok();
        let map = direct.as_ref().and_then(|_| Mapping::new(file, len));
        Ok(ReadBack { cached, direct, map, bounce: Vec::new(), pos: 0, len, stats: ReadStats::default() })
    }

    /// The same reader from byte `pos` on (a page boundary, or every read
    /// goes through the cache): one of several threads that each read a
    /// piece of the file.
    pub fn starting_at(mut self, pos: u64) -> Self {
        self.pos = pos.min(self.len);
        self
    }

    /// From `self.pos`, the length of the run of pages (at most `want`
    /// bytes) that are all cached or all not, and which. None when that
    /// cannot be told, or direct reads were given up.
    fn run(&self, want: usize) -> Option<(bool, usize)> {
        let map = self.map.as_ref()?;
        if self.pos % PAGE as u64 != 0 {
            return None;
        }
        let resident = map.resident(self.pos, want)?;
        let first = *resident.first()? & 1;
        let pages = resident.iter().take_while(|r| *r & 1 == first).count();
        Some((first == 1, (pages * PAGE).min(want)))
    }

    /// Reads up to `buf.len()` bytes at `self.pos` straight from the disk;
    /// 0 when that fails (a filesystem that refuses the alignment, say),
    /// and direct reads are then given up: the read through the cache that
    /// follows reports an error that is the disk's.
    fn read_direct(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(direct) = &self.direct else { return Ok(0) };
        // Whole pages, into a page-aligned buffer: the caller's own when it
        // is one (no copy), or one allocated once, at the most a run asks
        // for; the file's last page may be short, which the read reports.
        let ask = buf.len().next_multiple_of(PAGE);
        if ask == buf.len() && buf.as_ptr().align_offset(PAGE) == 0 {
            return match direct.read_at(buf, self.pos) {
                Ok(got) => Ok(got),
                Err(e) => Ok(self.give_up(e)),
            };
        }
        let need = self.bounce.len().max(ask + PAGE);
        self.bounce.resize(need, 0);
        let skip = self.bounce.as_ptr().align_offset(PAGE);
        let aligned = &mut self.bounce[skip..skip + ask];
        match direct.read_at(aligned, self.pos) {
            Ok(got) => {
                let n = got.min(buf.len());
                buf[..n].copy_from_slice(&aligned[..n]);
                Ok(n)
            }
            Err(e) => Ok(self.give_up(e)),
        }
    }

    /// After a direct read failed: reads go through the page cache from
    /// here. Returns the 0 bytes read.
    fn give_up(&mut self, e: io::Error) -> usize {
        tracing::debug!("direct read failed ({e}); reading through the page cache from here");
        self.direct = None;
        self.map = None;
        0
    }
}

impl Read for ReadBack {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.len - self.pos) as usize;
        if want == 0 {
            return Ok(0);
        }
        let run = self.run(want);
        let mut got = 0;
        if let Some((false, n)) = run {
            got = self.read_direct(&mut buf[..n.min(MAX_DIRECT)])?;
            self.stats.direct += got as u64;
        }
        if got == 0 {
            // Cached, no way to tell, or direct reads just given up:
            // through the page cache, up to the end of a cached run.
            let upto = match run {
                Some((true, n)) => n,
                _ => want,
            };
            got = self.cached.read_at(&mut buf[..upto], self.pos)?;
            self.stats.cached += got as u64;
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// A read-only shared mapping of a file's first bytes, only ever used to
/// ask which of its pages are in the page cache (it is never read).
struct Mapping {
    addr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: u64) -> Option<Self> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        // SAFETY: a fresh read-only mapping chosen by the kernel; nothing
        // dereferences it (mincore only looks at its pages' residency).
        let addr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return None;
        }
        Some(Mapping { addr: NonNull::new(addr)?, len })
    }

    /// One byte per page of `[at, at + len)` (`at` page-aligned), bit 0
    /// set when the page is cached.
    fn resident(&self, at: u64, len: usize) -> Option<Vec<u8>> {
        let at = usize::try_from(at).ok()?;
        let len = len.min(self.len.checked_sub(at)?);
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: [at, at + len) lies inside the mapping and `at` is
        // page-aligned; `vec` has one byte per page of it.
        let rc = unsafe { libc::mincore(self.addr.as_ptr().cast::<u8>().add(at).cast(), len, vec.as_mut_ptr()) };
        (rc == 0).then_some(vec)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `pages` pages of distinct bytes on a disk filesystem
    /// (direct reads need one: /var/tmp, not a tmpfs), flushed, with none
    /// of its pages cached.
    fn cold_file(pages: usize) -> (tempfile::TempDir, File, Vec<u8>) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let bytes: Vec<u8> = (0..pages * PAGE).map(|i| (i * 31 / 7 + i / PAGE) as u8).collect();
        let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(dir.path().join("img")).unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
        drop_cache(&f, 0, bytes.len());
        (dir, f, bytes)
    }

    fn drop_cache(f: &File, at: usize, len: usize) {
        nix::fcntl::posix_fadvise(f, at as i64, len as i64, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
            .unwrap();
    }

    fn warm(f: &File, at: usize, len: usize) {
        f.read_exact_at(&mut vec![0u8; len], at as u64).unwrap();
    }

    /// Reads it all in pieces of `piece` bytes; never more than its length.
    fn read_all(r: &mut ReadBack, piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; piece];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
            assert!(out.len() as u64 <= r.len, "read {} bytes of {}", out.len(), r.len);
        }
    }

    #[test]
    fn cold_pages_come_from_the_disk_and_cached_ones_from_the_cache() {
        let (_d, f, bytes) = cold_file(64);
        // Pages 8..16 and 40..41 cached, the rest not.
        warm(&f, 8 * PAGE, 8 * PAGE);
        warm(&f, 40 * PAGE, PAGE);
        let mut r = ReadBack::new(&f, bytes.len() as u64).unwrap();
        assert!(r.direct.is_some() && r.map.is_some(), "/var/tmp takes direct reads and mappings");
        assert_eq!(read_all(&mut r, 1 << 20), bytes);
        assert_eq!(r.stats, ReadStats { cached: 9 * PAGE as u64, direct: 55 * PAGE as u64 });
    }

    #[test]
    fn a_reader_started_inside_the_file_reads_its_rest_the_same_ways() {
        let (_d, f, bytes) = cold_file(64);
        warm(&f, 40 * PAGE, 2 * PAGE);
        let mut r = ReadBack::new(&f, bytes.len() as u64).unwrap().starting_at(32 * PAGE as u64);
        assert_eq!(read_all(&mut r, 3 * PAGE), &bytes[32 * PAGE..]);
        assert_eq!(r.stats, ReadStats { cached: 2 * PAGE as u64, direct: 30 * PAGE as u64 });
        let mut past = ReadBack::new(&f, bytes.len() as u64).unwrap().starting_at(1 << 30);
        assert_eq!(read_all(&mut past, PAGE), b"");
    }

    #[test]
    fn direct_reads_go_into_an_aligned_buffer_of_whole_pages_or_through_one_of_ours() {
        let (_d, f, bytes) = cold_file(8);
        let mut r = ReadBack::new(&f, bytes.len() as u64).unwrap();
        let mut buf = vec![0u8; 8 * PAGE];
        let skip = buf.as_ptr().align_offset(PAGE);
        // Aligned, but not whole pages: through our buffer, a page more than
        // the pages asked for.
        assert_eq!(r.read(&mut buf[skip..skip + PAGE + 100]).unwrap(), PAGE + 100);
        assert_eq!(r.bounce.len(), 3 * PAGE);
        assert!(r.direct.is_some(), "direct reads were given up");
        // Whole pages, aligned: straight into the caller's buffer.
        r = r.starting_at(2 * PAGE as u64);
        assert_eq!(r.read(&mut buf[skip..skip + 2 * PAGE]).unwrap(), 2 * PAGE);
        assert_eq!(&buf[skip..skip + 2 * PAGE], &bytes[2 * PAGE..4 * PAGE]);
        assert_eq!(r.bounce.len(), 3 * PAGE, "our buffer unused");
        assert_eq!(r.stats, ReadStats { cached: 0, direct: 3 * PAGE as u64 + 100 });
    }

    #[test]
    fn a_cold_run_longer_than_one_direct_read_takes_several() {
        let pages = MAX_DIRECT / PAGE * 2 + 3;
        let (_d, f, bytes) = cold_file(pages);
        let mut r = ReadBack::new(&f, bytes.len() as u64).unwrap();
        let mut buf = vec![0u8; bytes.len()];
        assert_eq!(r.read(&mut buf).unwrap(), MAX_DIRECT, "one direct read at the most");
        r.read_exact(&mut buf[MAX_DIRECT..]).unwrap();
        assert_eq!(buf, bytes);
        assert_eq!(r.stats, ReadStats { cached: 0, direct: bytes.len() as u64 });
    }

    #[test]
    fn reads_stop_at_the_length_asked_for_in_any_piece_size() {
        let (_d, f, bytes) = cold_file(20);
        warm(&f, 3 * PAGE, 2 * PAGE);
        // A length that ends inside a page, pieces that do not divide it.
        let len = 17 * PAGE + 100;
        for piece in [PAGE, 3 * PAGE + 5, 5 * PAGE, 1 << 20] {
            drop_cache(&f, 5 * PAGE, 15 * PAGE);
            let mut r = ReadBack::new(&f, len as u64).unwrap();
            assert_eq!(read_all(&mut r, piece), &bytes[..len], "pieces of {piece}");
            assert_eq!(r.stats.cached + r.stats.direct, len as u64);
            assert!(r.stats.direct > 0, "pieces of {piece}: {:?}", r.stats);
        }
    }

    #[test]
    fn the_end_of_a_file_shorter_than_a_page_is_read() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("short");
        std::fs::write(&path, b"0123456789").unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        drop_cache(&f, 0, PAGE);
        let mut r = ReadBack::new(&f, 10).unwrap();
        assert_eq!(read_all(&mut r, 4), b"0123456789");
        assert_eq!(r.stats.cached + r.stats.direct, 10);
    }

    #[test]
    fn a_failing_direct_read_gives_way_to_the_cache() {
        let (d, f, bytes) = cold_file(16);
        let mut r = ReadBack::new(&f, bytes.len() as u64).unwrap();
        // Reading a directory fails (EISDIR), as a refused direct read would.
        r.direct = Some(File::open(d.path()).unwrap());
        assert_eq!(read_all(&mut r, 3 * PAGE + 1), bytes);
        assert_eq!(r.stats, ReadStats { cached: bytes.len() as u64, direct: 0 });
        assert!(r.direct.is_none() && r.map.is_none());
    }

    #[test]
    fn an_empty_length_reads_nothing() {
        let (_d, f, _) = cold_file(1);
        let mut r = ReadBack::new(&f, 0).unwrap();
        assert_eq!(r.read(&mut [0u8; 16]).unwrap(), 0);
    }
}
