//! SHA-256 digests as a type, so a hex string from a manifest and a hash we
//! computed can only be compared after both were validated; and SHA-256
//! checkpoints, so one file's digest can be checked on every core.
//!
//! Why checkpoints: SHA-256 is a chain, each 64-byte block folded into the
//! state the blocks before it left, so one file's digest is computed on one
//! core (1.4 GB/s here, 0.3 s of a 425 MB image). The builder also records
//! the state at a few offsets ([`Checkpoint`]); a reader then hashes each
//! piece between two of them on its own core, from the state recorded at
//! the piece's start, and checks that it ends in the state recorded at its
//! end. Every piece checked, the first from SHA-256's own initial state and
//! the last finalized into the signed digest, is the same check as hashing
//! the file in one go: a changed byte changes the state its piece ends in,
//! and a wrong recorded state is simply one the piece before does not end
//! in.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A SHA-256 digest. Displays as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a sha256 digest (expected 64 lowercase hex digits)")]
pub struct BadDigest(pub String);

impl Sha256Digest {
    /// Hashes a byte slice.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Hashes everything `reader` yields; returns the digest and the byte count.
    pub fn of_reader(mut reader: impl Read) -> io::Result<(Self, u64)> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok((Self(hasher.finalize().into()), total))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl FromStr for Sha256Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Uppercase is refused so that one digest has one spelling (file names, URLs).
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(BadDigest(s.chars().take(80).collect()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadDigest(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl serde::Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Sha256Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental SHA-256 that also counts bytes.
#[derive(Clone, Default)]
pub struct StreamHasher {
    hasher: Sha256,
    count: u64,
}

impl StreamHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.count += bytes.len() as u64;
    }

    /// Bytes added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest and byte count.
    pub fn finish(self) -> (Sha256Digest, u64) {
        (Sha256Digest(self.hasher.finalize().into()), self.count)
    }
}

/// SHA-256's internal state after a prefix of a stream whose length is a
/// multiple of 64 bytes: eight 32-bit words, big-endian, shown as 64 hex
/// digits like a digest (it is one, of the prefix, without the padding).
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Bytes hashed before this state: a multiple of 64.
    pub at: u64,
    /// The state.
    pub state: Sha256Digest,
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const INITIAL: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// A SHA-256 that can start from a [`Checkpoint`] and report its state at
/// one, on top of the `sha2` crate's block function (SHA-NI where the CPU
/// has it).
#[derive(Clone)]
pub struct ResumableSha256 {
    state: [u32; 8],
    /// Bytes hashed, the buffered ones included.
    total: u64,
    buf: [u8; 64],
    buffered: usize,
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        Self { state: INITIAL, total: 0, buf: [0; 64], buffered: 0 }
    }
}

impl ResumableSha256 {
    /// From the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// From `at.at` bytes into a stream, whose state there is `at.state`;
    /// `None` when `at.at` is not a multiple of 64.
    pub fn resume(at: &Checkpoint) -> Option<Self> {
        if at.at % 64 != 0 {
            return None;
        }
        let mut state = [0u32; 8];
        for (word, bytes) in state.iter_mut().zip(at.state.0.chunks_exact(4)) {
            *word = u32::from_be_bytes(bytes.try_into().expect("4 bytes"));
        }
        Some(Self { state, total: at.at, buf: [0; 64], buffered: 0 })
    }

    /// Adds bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        // The buffered block first (with none buffered, the first 64 bytes
        // pass through the buffer; the result is the same).
        let n = (64 - self.buffered).min(bytes.len());
        self.buf[self.buffered..self.buffered + n].copy_from_slice(&bytes[..n]);
        self.buffered += n;
        bytes = &bytes[n..];
        if self.buffered < 64 {
            return;
        }
        sha2::block_api::compress256(&mut self.state, &[self.buf]);
        self.buffered = 0;
        let (blocks, rest) = whole_blocks(bytes);
        sha2::block_api::compress256(&mut self.state, blocks);
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    /// Bytes added so far (from the stream's start).
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The state now, when the bytes so far are a multiple of 64.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        (self.buffered == 0).then(|| Checkpoint { at: self.total, state: Sha256Digest(self.state_bytes()) })
    }

    fn state_bytes(&self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        for (four, word) in bytes.chunks_exact_mut(4).zip(self.state) {
            four.copy_from_slice(&word.to_be_bytes());
        }
        bytes
    }

    /// The digest of the whole stream and its length.
    pub fn finish(mut self) -> (Sha256Digest, u64) {
        // The padding: 0x80, zeros, and the length in bits, to a whole block.
        let mut tail = [0u8; 128];
        tail[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        tail[self.buffered] = 0x80;
        let n = if self.buffered < 56 { 64 } else { 128 };
        tail[n - 8..n].copy_from_slice(&(self.total * 8).to_be_bytes());
        let (blocks, _) = whole_blocks(&tail[..n]);
        sha2::block_api::compress256(&mut self.state, blocks);
        (Sha256Digest(self.state_bytes()), self.total)
    }
}

/// `bytes` as whole 64-byte blocks, and the rest (`<[u8]>::as_chunks`,
/// which needs a newer Rust than this crate's minimum).
fn whole_blocks(bytes: &[u8]) -> (&[[u8; 64]], &[u8]) {
    use sha2::digest::array::Array;
    use sha2::digest::typenum::U64;
    let (blocks, rest) = Array::<u8, U64>::slice_as_chunks(bytes);
    (Array::cast_slice_to_core(blocks), rest)
}

/// Where a builder records [`Checkpoint`]s in an image whose first
/// `data_len` bytes are its filesystem: about every sixteenth of it, on
/// MiB boundaries, and at its end (where its dm-verity tree starts). None
/// for less than 2 MiB, which one core hashes in a millisecond.
pub fn checkpoint_offsets(data_len: u64) -> Vec<u64> {
    const MIB: u64 = 1 << 20;
    if data_len < 2 * MIB || data_len % 64 != 0 {
        return Vec::new();
    }
    let every = (data_len / CHECKPOINTS).next_multiple_of(MIB).max(MIB);
    let mut at: Vec<u64> = (1..CHECKPOINTS).map(|k| k * every).take_while(|&o| o < data_len).collect();
    at.push(data_len);
    at
}

/// How many pieces [`checkpoint_offsets`] cuts an image into, at most.
pub const CHECKPOINTS: u64 = 16;

/// A reader that hashes what passes through it, so a download is verified
/// while it streams instead of being read twice.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest of everything read so far.
    pub fn finish(self) -> (Sha256Digest, u64) {
        (Sha256Digest(self.hasher.finalize().into()), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let d = Sha256Digest::of_bytes(b"");
        let s = d.to_string();
        assert_eq!(s, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(s.parse::<Sha256Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in ["", "abc", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resumable_sha256_is_sha256_for_every_length_and_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in (0..200).chain([255, 256, 257, 511, 512, 513, 1000]) {
            let want = (Sha256Digest::of_bytes(&data[..len]), len as u64);
            let mut one = ResumableSha256::new();
            one.update(&data[..len]);
            assert_eq!(one.finish(), want, "{len} bytes at once");
            for split in [0, 1, 55, 56, 63, 64, 65, 119, 120, 128].into_iter().filter(|&s| s <= len) {
                let mut two = ResumableSha256::new();
                two.update(&data[..split]);
                two.update(&data[split..len]);
                assert_eq!(two.count(), len as u64);
                assert_eq!(two.finish(), want, "{len} bytes split at {split}");
            }
        }
    }

    #[test]
    fn a_checkpoint_resumes_the_same_hash_only_on_a_block_boundary() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let whole = Sha256Digest::of_bytes(&data);
        let mut h = ResumableSha256::new();
        h.update(&data[..100]);
        assert_eq!(h.checkpoint(), None, "100 bytes is not a whole number of blocks");
        h.update(&data[100..128]);
        let cp = h.checkpoint().unwrap();
        assert_eq!(cp.at, 128);
        let mut again = ResumableSha256::resume(&cp).unwrap();
        again.update(&data[128..]);
        assert_eq!(again.finish(), (whole, data.len() as u64));
        // A state one bit off gives another digest.
        let mut wrong = cp;
        wrong.state.0[31] ^= 1;
        let mut bad = ResumableSha256::resume(&wrong).unwrap();
        bad.update(&data[128..]);
        assert_ne!(bad.finish().0, whole);
        assert!(ResumableSha256::resume(&Checkpoint { at: 100, state: cp.state }).is_none());
        // From the start, the state is SHA-256's initial one.
        let start = ResumableSha256::new().checkpoint().unwrap();
        assert_eq!(start.at, 0);
        assert_eq!(start.state.to_string(), "6a09e667bb67ae853c6ef372a54ff53a510e527f9b05688c1f83d9ab5be0cd19");
    }

    #[test]
    fn checkpoints_cut_an_image_into_at_most_sixteen_pieces_on_mib_boundaries() {
        const MIB: u64 = 1 << 20;
        assert!(checkpoint_offsets(0).is_empty());
        assert!(checkpoint_offsets(2 * MIB - 4096).is_empty(), "small: one core is enough");
        assert!(checkpoint_offsets(400 * MIB + 32).is_empty(), "not a whole number of blocks");
        assert_eq!(checkpoint_offsets(2 * MIB), [MIB, 2 * MIB]);
        assert_eq!(checkpoint_offsets(2 * MIB + 64), [MIB, 2 * MIB, 2 * MIB + 64]);
        for len in [3 * MIB, 16 * MIB, 17 * MIB + 4096, 425_000 * 4096, 5 << 30, 1 << 40] {
            let at = checkpoint_offsets(len);
            assert_eq!(at.last(), Some(&len), "{len}: ends at the data's end");
            assert!(at.len() as u64 <= CHECKPOINTS, "{len}: {} checkpoints", at.len());
            assert!(at.len() >= 2, "{len}: {at:?}");
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{len}: increasing");
            assert!(at[..at.len() - 1].iter().all(|o| o % MIB == 0), "{len}: MiB boundaries");
            // The pieces are even: none longer than the first.
            let first = at[0];
            assert!(at.windows(2).all(|w| w[1] - w[0] <= first), "{len}: {at:?}");
            assert!(first * CHECKPOINTS < len + CHECKPOINTS * MIB, "{len}: pieces of {first}");
        }
    }

    /// Yields one error first, then `data`.
    struct Flaky<'a> {
        first: Option<io::ErrorKind>,
        data: &'a [u8],
    }

    impl Read for Flaky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.first.take() {
                Some(kind) => Err(io::Error::from(kind)),
                None => self.data.read(buf),
            }
        }
    }

    #[test]
    fn a_reader_interrupted_is_read_again_and_any_other_error_is_returned() {
        let data = vec![5u8; 3000];
        let interrupted = Flaky { first: Some(io::ErrorKind::Interrupted), data: &data };
        assert_eq!(Sha256Digest::of_reader(interrupted).unwrap(), (Sha256Digest::of_bytes(&data), 3000));
        let failed = Flaky { first: Some(io::ErrorKind::UnexpectedEof), data: &data };
        assert_eq!(Sha256Digest::of_reader(failed).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn stream_hasher_counts_and_hashes_what_it_is_given() {
        let mut h = StreamHasher::new();
        h.update(b"abc");
        h.update(b"defg");
        assert_eq!(h.count(), 7);
        assert_eq!(h.finish(), (Sha256Digest::of_bytes(b"abcdefg"), 7));
        let d = Sha256Digest::of_bytes(b"");
        assert_eq!(format!("{d:?}"), format!("sha256:{d}"));
    }

    #[test]
    fn hashing_reader_matches_one_shot() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = HashingReader::new(&data[..]);
        // Bounded: a reader that never ends must not hang the test.
        io::copy(&mut r.by_ref().take(data.len() as u64 + 10), &mut io::sink()).unwrap();
        assert_eq!(r.count(), data.len() as u64);
        let (d, n) = r.finish();
        assert_eq!(n, data.len() as u64);
        assert_eq!(d, Sha256Digest::of_bytes(&data));
        assert_eq!(Sha256Digest::of_reader(&data[..]).unwrap(), (d, n));
    }
}
