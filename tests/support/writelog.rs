//! Power-loss states from a block write log.
//!
//! qemu's `blklogwrites` block driver (and the kernel's dm-log-writes target,
//! whose on-disk format it shares) records every write a guest makes to a
//! disk, in completion order, and every flush. From that log and the disk as
//! it was before, any moment of the run can be rebuilt — and, more to the
//! point, any state a disk with a volatile write cache could be left in by a
//! power cut at that moment: everything up to the last completed flush is
//! on the platter; each write after it may have landed whole, not at all, or
//! in part (torn at 4 KiB blocks, the unit a drive writes atomically).
//!
//! The format (all little-endian): sector 0 holds the superblock
//! `{magic, version, nr_entries: u64, sectorsize: u32}`; from sector 1 on,
//! each entry is one header sector `{sector, nr_sectors, flags, data_len:
//! u64}` followed by `nr_sectors` sectors of data (none for a discard).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;
/// The entry is a flush: every write logged before it is durable.
pub const FLUSH: u64 = 1;
/// The write was FUA (durable on its own).
pub const FUA: u64 = 1 << 1;
/// The entry discards its range (no data follows).
pub const DISCARD: u64 = 1 << 2;
/// A user mark (no data).
pub const MARK: u64 = 1 << 3;
/// Metadata hint (dm-log-writes only).
pub const METADATA: u64 = 1 << 4;
/// Blocks a drive writes atomically; a torn write keeps or loses each one whole.
pub const ATOMIC_BLOCK: u64 = 4096;

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First sector written (in log sectors).
    pub sector: u64,
    /// Sectors written.
    pub nr_sectors: u64,
    /// `FLUSH`, `FUA`, `DISCARD`, `MARK`, `METADATA`.
    pub flags: u64,
    /// Where its data starts in the log file.
    pub data_offset: u64,
}

impl Entry {
    /// A flush (possibly with no data).
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0
    }
    /// A write that carries data (or a discard) for the disk.
    pub fn touches_disk(&self) -> bool {
        self.nr_sectors > 0 && self.flags & MARK == 0
    }
}

/// A parsed write log.
#[derive(Debug)]
pub struct WriteLog {
    file: File,
    /// Bytes per log sector.
    pub sector_size: u64,
    /// Every entry, in log order.
    pub entries: Vec<Entry>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl WriteLog {
    /// Parses the log at `path`, checking every entry lies within the file.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut sb = [0u8; 28];
        file.read_exact_at(&mut sb, 0).map_err(|e| bad(format!("{}: no superblock ({e})", path.display())))?;
        if le64(&sb, 0) != MAGIC || le64(&sb, 8) != VERSION {
            return Err(bad(format!("{}: not a dm-log-writes log (magic or version)", path.display())));
        }
        let nr_entries = le64(&sb, 16);
        let sector_size = u32::from_le_bytes(sb[24..28].try_into().expect("4 bytes")) as u64;
        if !sector_size.is_power_of_two() || sector_size < 512 {
            return Err(bad(format!("{}: sector size {sector_size}", path.display())));
        }
        let mut entries = Vec::with_capacity(nr_entries as usize);
        let mut at = sector_size;
        let mut hdr = [0u8; 32];
        for i in 0..nr_entries {
            file.read_exact_at(&mut hdr, at).map_err(|e| bad(format!("entry {i} at byte {at}: {e}")))?;
            let (sector, nr_sectors, flags) = (le64(&hdr, 0), le64(&hdr, 8), le64(&hdr, 16));
            if flags & !(FLUSH | FUA | DISCARD | MARK | METADATA) != 0 {
                return Err(bad(format!("entry {i}: unknown flags {flags:#x}")));
            }
            let data_offset = at + sector_size;
            let data = if flags & DISCARD != 0 { 0 } else { nr_sectors * sector_size };
            at = data_offset + data;
            if at > len {
                return Err(bad(format!("entry {i}: data runs past the end of the log ({at} > {len})")));
            }
            entries.push(Entry { sector, nr_sectors, flags, data_offset });
        }
        Ok(WriteLog { file, sector_size, entries })
    }

    /// The data entry `i` wrote (zeros for a discard).
    pub fn data(&self, i: usize) -> io::Result<Vec<u8>> {
        let e = &self.entries[i];
        let mut buf = vec![0u8; (e.nr_sectors * self.sector_size) as usize];
        if e.flags & DISCARD == 0 {
            self.file.read_exact_at(&mut buf, e.data_offset)?;
        }
        Ok(buf)
    }

    /// Byte offset on the disk that entry `i` starts at.
    pub fn disk_offset(&self, i: usize) -> u64 {
        self.entries[i].sector * self.sector_size
    }

    /// Writes entry `i` to `disk` whole.
    pub fn apply(&self, i: usize, disk: &File) -> io::Result<()> {
        if self.entries[i].touches_disk() {
            disk.write_all_at(&self.data(i)?, self.disk_offset(i))?;
        }
        Ok(())
    }

    /// Writes only the `ATOMIC_BLOCK`-aligned blocks of entry `i` that `keep`
    /// chooses (by block number on the disk): a torn write. Returns how many
    /// blocks were kept.
    pub fn apply_torn(&self, i: usize, disk: &File, mut keep: impl FnMut(u64) -> bool) -> io::Result<usize> {
        if !self.entries[i].touches_disk() {
            return Ok(0);
        }
        let data = self.data(i)?;
        let start = self.disk_offset(i);
        let end = start + data.len() as u64;
        let mut kept = 0;
        let mut pos = start;
        while pos < end {
            let block_end = ((pos / ATOMIC_BLOCK) + 1) * ATOMIC_BLOCK;
            let piece_end = block_end.min(end);
            if keep(pos / ATOMIC_BLOCK) {
                disk.write_all_at(&data[(pos - start) as usize..(piece_end - start) as usize], pos)?;
                kept += 1;
            }
            pos = piece_end;
        }
        Ok(kept)
    }

    /// Indices of the entries whose data contains `needle` at its start.
    pub fn writes_starting_with(&self, needle: &[u8]) -> io::Result<Vec<usize>> {
        let mut found = Vec::new();
        let mut head = vec![0u8; needle.len()];
        for (i, e) in self.entries.iter().enumerate() {
            if e.touches_disk() && e.flags & DISCARD == 0 && e.nr_sectors * self.sector_size >= needle.len() as u64 {
                self.file.read_exact_at(&mut head, e.data_offset)?;
                if head == needle {
                    found.push(i);
                }
            }
        }
        Ok(found)
    }
}

/// What happened to one write issued after the last flush when the power went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It reached the disk.
    Landed,
    /// It was lost in the drive's cache.
    Lost,
    /// Some of its 4 KiB blocks reached the disk.
    Torn,
}

/// A power cut: the writes logged before `at` had been issued; those after
/// the last flush before `at` met their `fates`.
#[derive(Debug, Clone)]
pub struct PowerCut {
    /// Entries `0..at` had completed when the power went.
    pub at: usize,
    /// The index just past the last flush before `at` (entries before it are durable).
    pub durable: usize,
    /// For each entry in `durable..at`, what happened to it.
    pub fates: Vec<Fate>,
}

/// splitmix64: small, seedable, good enough to pick cut points reproducibly.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

impl WriteLog {
    /// Index just past the last flush among entries `0..at` (0 when none).
    /// A flush that carries data (a write with PREFLUSH) makes the writes
    /// before it durable, not its own data.
    pub fn durable_prefix(&self, at: usize) -> usize {
        match self.entries[..at].iter().rposition(Entry::is_flush) {
            Some(i) if self.entries[i].touches_disk() => i,
            Some(i) => i + 1,
            None => 0,
        }
    }

    /// A cut after entry `at - 1` in which each write since the last flush
    /// lands (3/8), is lost (1/2) or is torn (1/8).
    pub fn random_cut(&self, at: usize, rng: &mut Rng) -> PowerCut {
        let durable = self.durable_prefix(at);
        let fates = (durable..at)
            .map(|i| match rng.below(8) {
                // A completed FUA write is on the platter.
                _ if self.entries[i].flags & FUA != 0 => Fate::Landed,
                0..=3 => Fate::Lost,
                4..=6 => Fate::Landed,
                _ => Fate::Torn,
            })
            .collect();
        PowerCut { at, durable, fates }
    }

    /// Applies entries `range` whole, in order.
    pub fn apply_range(&self, disk: &File, range: std::ops::Range<usize>) -> io::Result<()> {
        range.into_iter().try_for_each(|i| self.apply(i, disk))
    }

    /// Applies what `cut` did to the writes after its last flush, onto a
    /// `disk` that already holds entries `0..cut.durable`. Returns how many
    /// writes were lost or torn.
    pub fn apply_fates(&self, disk: &File, cut: &PowerCut, rng: &mut Rng) -> io::Result<usize> {
        let mut damaged = 0;
        for (k, fate) in cut.fates.iter().enumerate() {
            let i = cut.durable + k;
            if !self.entries[i].touches_disk() {
                continue;
            }
            match fate {
                Fate::Landed => self.apply(i, disk)?,
                Fate::Lost => damaged += 1,
                Fate::Torn => {
                    self.apply_torn(i, disk, |_| rng.below(2) == 0)?;
                    damaged += 1;
                }
            }
        }
        Ok(damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Builds a log in the on-disk format: entries of (sector, flags, data).
    fn log_file(entries: &[(u64, u64, Vec<u8>)], nr_entries: u64) -> tempfile::NamedTempFile {
        let ss = 512usize;
        let mut out = vec![0u8; ss];
        out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&nr_entries.to_le_bytes());
        out[24..28].copy_from_slice(&(ss as u32).to_le_bytes());
        for (sector, flags, data) in entries {
            let mut hdr = vec![0u8; ss];
            hdr[0..8].copy_from_slice(&sector.to_le_bytes());
            hdr[8..16].copy_from_slice(&((data.len() / ss) as u64).to_le_bytes());
            hdr[16..24].copy_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&hdr);
            out.extend_from_slice(data);
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&out).unwrap();
        f
    }

    fn disk(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    #[test]
    fn replays_writes_and_respects_flushes() {
        let log = log_file(
            &[
                (0, 0, vec![1u8; 4096]),
                (0, FLUSH, Vec::new()),
                (8, 0, vec![2u8; 8192]),
                (0, 0, vec![3u8; 512]),
                (24, FLUSH, vec![4u8; 512]),
            ],
            5,
        );
        let w = WriteLog::open(log.path()).unwrap();
        assert_eq!(w.entries.len(), 5);
        assert_eq!(w.durable_prefix(4), 2);
        assert_eq!(w.durable_prefix(5), 4, "a flush with data does not make its own data durable");
        assert_eq!(w.durable_prefix(1), 0);
        // Everything applied: the final disk.
        let d = disk(16384);
        w.apply_range(d.as_file(), 0..5).unwrap();
        let all = std::fs::read(d.path()).unwrap();
        assert_eq!(all[0], 3);
        assert_eq!(all[512], 1);
        assert_eq!(all[4096], 2);
        assert_eq!(all[12287], 2);
        assert_eq!(all[12288], 4);
        // A cut after entry 3 that loses every unflushed write leaves only the flushed one.
        let d = disk(16384);
        let cut = PowerCut { at: 4, durable: 2, fates: vec![Fate::Lost, Fate::Lost] };
        w.apply_range(d.as_file(), 0..cut.durable).unwrap();
        let lost = w.apply_fates(d.as_file(), &cut, &mut Rng(1)).unwrap();
        assert_eq!(lost, 2);
        let s = std::fs::read(d.path()).unwrap();
        assert!(s[..4096].iter().all(|&b| b == 1) && s[4096..].iter().all(|&b| b == 0));
        // A torn 8 KiB write keeps whole 4 KiB blocks only.
        let d = disk(16384);
        let kept = w.apply_torn(2, d.as_file(), |block| block == 2).unwrap();
        assert_eq!(kept, 1);
        let s = std::fs::read(d.path()).unwrap();
        assert!(s[4096..8192].iter().all(|&b| b == 0) && s[8192..12288].iter().all(|&b| b == 2));
        assert_eq!(w.writes_starting_with(&[4u8; 3]).unwrap(), vec![4]);
    }

    #[test]
    fn rejects_foreign_and_truncated_logs() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 1024]).unwrap();
        assert!(WriteLog::open(f.path()).unwrap_err().to_string().contains("not a dm-log-writes log"));
        // Claims two entries, holds one.
        let log = log_file(&[(0, 0, vec![1u8; 512])], 2);
        assert!(WriteLog::open(log.path()).unwrap_err().to_string().contains("entry 1"));
        // Data cut short.
        let log = log_file(&[(0, 0, vec![1u8; 1024])], 1);
        std::fs::OpenOptions::new().write(true).open(log.path()).unwrap().set_len(1024 + 512).unwrap();
        assert!(WriteLog::open(log.path()).unwrap_err().to_string().contains("past the end"));
        let log = log_file(&[(0, 1 << 9, Vec::new())], 1);
        assert!(WriteLog::open(log.path()).unwrap_err().to_string().contains("unknown flags"));
    }

    #[test]
    fn random_cuts_are_reproducible_and_mix_fates() {
        let entries: Vec<_> =
            (0..40).map(|i| (i * 8, if i % 10 == 9 { FLUSH } else { 0 }, vec![i as u8; 4096])).collect();
        let log = log_file(&entries, 40);
        let w = WriteLog::open(log.path()).unwrap();
        let a = w.random_cut(35, &mut Rng(7));
        let b = w.random_cut(35, &mut Rng(7));
        assert_eq!(a.fates, b.fates);
        assert_eq!(a.durable, 29, "entry 29 is a flush carrying data: the writes before it are durable");
        let mut rng = Rng(3);
        let fates: Vec<Fate> = (0..20).flat_map(|_| w.random_cut(39, &mut rng).fates).collect();
        for f in [Fate::Landed, Fate::Lost, Fate::Torn] {
            assert!(fates.contains(&f), "{f:?} never chosen");
        }
    }
}
