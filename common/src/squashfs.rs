//! The squashfs superblock: enough of the format to tell an operator what an
//! image is (`imgbuild inspect`) and to refuse a payload that is not a
//! squashfs image before the kernel is asked to mount it.

use std::fmt;

/// Size of the on-disk superblock.
pub const SUPERBLOCK_BYTES: usize = 96;
const MAGIC: u32 = 0x7371_7368; // "hsqs" little endian

/// Why bytes are not a usable squashfs superblock.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    /// Fewer than 96 bytes.
    #[error("too short for a squashfs superblock ({0} bytes, need 96)")]
    Short(usize),
    /// Wrong magic number.
    #[error("not a squashfs image (bad magic {0:#010x})")]
    Magic(u32),
    /// Not version 4.0.
    #[error("squashfs version {0}.{1} is not supported (need 4.0)")]
    Version(u16, u16),
    /// Block size and its log disagree or are out of range.
    #[error("corrupt squashfs superblock: block size {0} with block_log {1}")]
    BlockSize(u32, u16),
    /// `bytes_used` is larger than the file.
    #[error("squashfs claims {claimed} bytes but the image has {actual}")]
    Truncated {
        /// `bytes_used` from the superblock.
        claimed: u64,
        /// The image's size.
        actual: u64,
    },
}

/// The facts a squashfs 4.0 superblock records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    /// Number of inodes.
    pub inode_count: u32,
    /// Filesystem modification time (seconds since the epoch).
    pub modification_time: u32,
    /// Data block size in bytes.
    pub block_size: u32,
    /// Number of fragment table entries.
    pub fragment_entry_count: u32,
    /// Compressor id (6 = zstd).
    pub compression_id: u16,
    /// Superblock flags.
    pub flags: u16,
    /// Number of distinct uids/gids.
    pub id_count: u16,
    /// Bytes of the image in use (the rest is padding).
    pub bytes_used: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Superblock {
    /// Parses the first 96 bytes of an image.
    pub fn parse(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() < SUPERBLOCK_BYTES {
            return Err(SuperblockError::Short(b.len()));
        }
        let magic = le32(b, 0);
        if magic != MAGIC {
            return Err(SuperblockError::Magic(magic));
        }
        let (major, minor) = (le16(b, 28), le16(b, 30));
        if (major, minor) != (4, 0) {
            return Err(SuperblockError::Version(major, minor));
        }
        let block_size = le32(b, 12);
        let block_log = le16(b, 22);
        if !(12..=20).contains(&block_log) || block_size != 1u32 << block_log {
            return Err(SuperblockError::BlockSize(block_size, block_log));
        }
        Ok(Self {
            inode_count: le32(b, 4),
            modification_time: le32(b, 8),
            block_size,
            fragment_entry_count: le32(b, 16),
            compression_id: le16(b, 20),
            flags: le16(b, 24),
            id_count: le16(b, 26),
            bytes_used: le64(b, 40),
        })
    }

    /// Checks that the image is at least as long as the superblock says.
    pub fn check_size(&self, actual: u64) -> Result<(), SuperblockError> {
        if self.bytes_used > actual {
            return Err(SuperblockError::Truncated { claimed: self.bytes_used, actual });
        }
        Ok(())
    }

    /// The compressor's name.
    pub fn compression(&self) -> &'static str {
        match self.compression_id {
            1 => "gzip",
            2 => "lzma",
            3 => "lzo",
            4 => "xz",
            5 => "lz4",
            6 => "zstd",
            _ => "unknown",
        }
    }
}

impl fmt::Display for Superblock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "squashfs 4.0, {} compression, {} KiB blocks, {} inodes, {} ids, {} fragments, {} bytes used, flags {:#06x}",
            self.compression(),
            self.block_size / 1024,
            self.inode_count,
            self.id_count,
            self.fragment_entry_count,
            self.bytes_used,
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Vec<u8> {
        let mut b = vec![0u8; 96];
        b[0..4].copy_from_slice(b"hsqs");
        b[4..8].copy_from_slice(&5u32.to_le_bytes());
        b[12..16].copy_from_slice(&131072u32.to_le_bytes());
        b[20..22].copy_from_slice(&6u16.to_le_bytes());
        b[22..24].copy_from_slice(&17u16.to_le_bytes());
        b[28..30].copy_from_slice(&4u16.to_le_bytes());
        b[40..48].copy_from_slice(&4096u64.to_le_bytes());
        b
    }

    #[test]
    fn parses_and_rejects() {
        let sb = Superblock::parse(&good()).unwrap();
        assert_eq!((sb.inode_count, sb.block_size, sb.compression(), sb.bytes_used), (5, 131072, "zstd", 4096));
        assert!(sb.check_size(4096).is_ok());
        assert!(sb.check_size(4095).is_err());
        assert_eq!(Superblock::parse(&good()[..95]), Err(SuperblockError::Short(95)));
        let table: &[(usize, u8)] = &[(0, b'x'), (28, 3), (22, 16), (12, 1)];
        for &(at, v) in table {
            let mut b = good();
            b[at] = v;
            assert!(Superblock::parse(&b).is_err(), "byte {at}");
        }
    }
}
