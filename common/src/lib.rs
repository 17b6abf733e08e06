//! Shared building blocks of `imgbuild` and `imgdeploy`.
//!
//! Both binaries must agree, byte for byte, on what a published image is: the
//! manifest's schema ([`manifest`]), how it is signed and which keys are
//! trusted ([`sign`]), how a manifest is accepted ([`trust`]: signature first,
//! then parsing, then expiry), how images are hashed ([`digest`]) and what a
//! squashfs superblock says ([`squashfs`]). Keeping that here means the builder
//! cannot publish something the deployer would read differently.
//!
//! ```
//! use imgdeploy_common::digest::Sha256Digest;
//! let d = Sha256Digest::of_bytes(b"abc");
//! assert_eq!(d.to_string(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
//! ```
#![deny(missing_docs)]

pub mod atomic;
pub mod blockmap;
pub mod chunk;
#[cfg(feature = "cli")]
pub mod cli;
pub mod compress;
pub mod digest;
pub mod location;
pub mod manifest;
pub mod multipart;
pub mod netboot;
pub mod report;
pub mod rollout;
pub mod sdelta;
pub mod sign;
pub mod squashfs;
pub mod text;
pub mod transport;
pub mod trust;
pub mod verity;

/// `n` incompressible, deterministic bytes of the xorshift64 sequence that
/// starts from state `x` (non-zero): the unit tests' shared test data.
#[cfg(test)]
pub(crate) fn test_noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Upper bound on a manifest's size; anything larger is refused before it is read.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// An Ed25519 signature is exactly this long; the `.sig` file holds nothing else.
pub const SIGNATURE_BYTES: usize = 64;
