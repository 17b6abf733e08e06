//! Ed25519 keys in the PEM formats openssl uses (PKCS#8 private keys,
//! SubjectPublicKeyInfo public keys), signing, and verification against a set
//! of trusted keys (several at once, so keys can be rotated).

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::digest::Sha256Digest;
use crate::SIGNATURE_BYTES;

/// Errors from reading keys or checking signatures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {path}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an Ed25519 private key in PKCS#8 PEM.
    #[error("{path} is not an Ed25519 private key in PKCS#8 PEM; create one with `imgbuild keygen --out PREFIX` or `openssl genpkey -algorithm ed25519`")]
    BadPrivateKey {
        /// The key file.
        path: PathBuf,
    },
    /// The file is not an Ed25519 public key in SubjectPublicKeyInfo PEM.
    #[error("{path} is not an Ed25519 public key in PEM (SubjectPublicKeyInfo); export one with `openssl pkey -in KEY -pubout`")]
    BadPublicKey {
        /// The key file.
        path: PathBuf,
    },
    /// A signature file is not 64 bytes long.
    #[error(
        "the signature is {len} bytes long, an Ed25519 signature is 64; the .sig file is truncated or not a signature"
    )]
    SignatureLength {
        /// The length found.
        len: usize,
    },
    /// No trusted key verifies the signature.
    #[error("the signature does not verify with any of the {keys} trusted key(s) ({ids}); the manifest was tampered with or signed by a key this host does not trust")]
    Untrusted {
        /// How many keys were tried.
        keys: usize,
        /// Their short ids.
        ids: String,
    },
    /// Encoding a key to PEM failed.
    #[error("cannot encode the key as PEM")]
    Encode,
}

/// A short, stable name for a public key: the first 8 bytes of the sha256 of
/// its raw 32 bytes, in hex. Shown in messages so an operator can tell keys apart.
pub fn key_id(key: &VerifyingKey) -> String {
    let d = Sha256Digest::of_bytes(key.as_bytes());
    d.to_string()[..16].to_owned()
}

/// Surrounding whitespace and CRLF line ends removed, one final newline.
fn normalise(pem: &str) -> String {
    let mut s = pem.trim().replace("\r\n", "\n");
    s.push('\n');
    s
}

/// The private signing key a CI pipeline holds.
pub struct PrivateKey {
    key: SigningKey,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material, even in debug output.
        write!(f, "PrivateKey({})", key_id(&self.key.verifying_key()))
    }
}

impl PrivateKey {
    /// Makes a new key from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom_error::Error> {
        let mut seed = [0u8; 32];
        getrandom_error::fill(&mut seed)?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    /// Parses a PKCS#8 PEM private key; `origin` names it in errors.
    pub fn from_pem(pem: &str, origin: &Path) -> Result<Self, KeyError> {
        // CI secrets often gain or lose trailing newlines; the PEM decoder is strict about them.
        SigningKey::from_pkcs8_pem(&normalise(pem))
            .map(|key| Self { key })
            .map_err(|_| KeyError::BadPrivateKey { path: origin.to_owned() })
    }

    /// Reads a PKCS#8 PEM private key file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        Self::from_pem(&pem, path)
    }

    /// The PKCS#8 PEM text of this key, in the version 1 form (seed only,
    /// as `openssl genpkey` writes): OpenSSL 3.0 cannot read the version 2
    /// form that also embeds the public key.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        let v1 = ed25519_dalek::pkcs8::KeypairBytes { secret_key: self.key.to_bytes(), public_key: None };
        let pem = v1.to_pkcs8_pem(Default::default()).map_err(|_| KeyError::Encode)?;
        Ok(pem.to_string())
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey { key: self.key.verifying_key() }
    }

    /// Signs `message`, returning the raw 64-byte signature.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        self.key.sign(message).to_bytes()
    }
}

/// A trusted public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM public key; `origin` names it in errors.
    pub fn from_pem(pem: &str, origin: &Path) -> Result<Self, KeyError> {
        VerifyingKey::from_public_key_pem(&normalise(pem))
            .map(|key| Self { key })
            .map_err(|_| KeyError::BadPublicKey { path: origin.to_owned() })
    }

    /// Reads a public key PEM file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        Self::from_pem(&pem, path)
    }

    /// The PEM text of this key.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.key.to_public_key_pem(Default::default()).map_err(|_| KeyError::Encode)
    }

    /// The key's short id (see [`key_id`]).
    pub fn id(&self) -> String {
        key_id(&self.key)
    }

    /// Checks `signature` over `message` with this key alone.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        verify_any(std::slice::from_ref(self), message, signature).map(|_| ())
    }
}

/// Checks a detached signature against every trusted key; returns the key
/// that verified it. Uses strict verification (which implies the plain
/// check) so that malleated signatures (the same message, other signature
/// bytes) and signatures that hold for any message under a weak key are refused.
pub fn verify_any<'k>(trusted: &'k [PublicKey], message: &[u8], signature: &[u8]) -> Result<&'k PublicKey, KeyError> {
    let bytes: [u8; SIGNATURE_BYTES] =
        signature.try_into().map_err(|_| KeyError::SignatureLength { len: signature.len() })?;
    let sig = Signature::from_bytes(&bytes);
    trusted.iter().find(|k| k.key.verify_strict(message, &sig).is_ok()).ok_or_else(|| KeyError::Untrusted {
        keys: trusted.len(),
        ids: trusted.iter().map(PublicKey::id).collect::<Vec<_>>().join(", "),
    })
}

/// Re-export of the random source's error, so callers need not depend on getrandom.
pub mod getrandom_error {
    pub use getrandom::{fill, Error};
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn sign_verify_round_trip_through_pem() {
        let sk = PrivateKey::generate().unwrap();
        let pem = sk.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let sk2 = PrivateKey::from_pem(&pem, Path::new("k")).unwrap();
        // Extra blank lines and CRLF (as CI secrets deliver them) are accepted.
        PrivateKey::from_pem(&format!("\n{}\n\n", pem.replace('\n', "\r\n")), Path::new("k")).unwrap();
        let pk = PublicKey::from_pem(&sk2.public().to_pem().unwrap(), Path::new("p")).unwrap();
        let sig = sk.sign(b"hello");
        pk.verify(b"hello", &sig).unwrap();
        assert!(matches!(pk.verify(b"hellp", &sig), Err(KeyError::Untrusted { keys: 1, .. })));
    }

    #[test]
    fn rejects_wrong_length_and_other_keys() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        let sig = a.sign(b"m");
        let keys = [b.public()];
        assert!(matches!(verify_any(&keys, b"m", &sig[..63]), Err(KeyError::SignatureLength { len: 63 })));
        assert!(matches!(verify_any(&keys, b"m", &sig), Err(KeyError::Untrusted { .. })));
        let rotated = [b.public(), a.public()];
        assert_eq!(verify_any(&rotated, b"m", &sig).unwrap(), &a.public());
    }

    /// A small-order public key with the identity as R and s = 0 "signs"
    /// every message under the plain cofactorless check; strict
    /// verification refuses it.
    #[test]
    fn a_weak_key_signs_nothing() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = PublicKey { key: VerifyingKey::from_bytes(&identity).unwrap() };
        let mut sig = [0u8; SIGNATURE_BYTES];
        sig[0] = 1;
        assert!(weak.key.verify(b"any message", &Signature::from_bytes(&sig)).is_ok(), "the plain check accepts it");
        assert!(matches!(verify_any(&[weak], b"any message", &sig), Err(KeyError::Untrusted { keys: 1, .. })));
    }

    /// Ids are the first 16 hex digits of the sha256 of the raw key; debug
    /// output names the id and never the key material.
    #[test]
    fn ids_and_debug_output() {
        let sk = PrivateKey::generate().unwrap();
        let pk = sk.public();
        let id = Sha256Digest::of_bytes(pk.key.as_bytes()).to_string()[..16].to_owned();
        assert_eq!(pk.id(), id);
        assert_eq!(key_id(&pk.key), id);
        assert_eq!(format!("{pk:?}"), format!("PublicKey({id})"));
        assert_eq!(format!("{sk:?}"), format!("PrivateKey({id})"));
        let pem = sk.to_pem().unwrap();
        let secret_line = pem.lines().nth(1).unwrap();
        assert!(!format!("{sk:?}").contains(secret_line));
        let e = verify_any(std::slice::from_ref(&pk), b"m", &[0u8; 64]).unwrap_err().to_string();
        assert!(e.contains(&id), "{e}");
    }

    #[test]
    fn rejects_garbage_pem() {
        for bad in ["", "hello", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"] {
            assert!(PublicKey::from_pem(bad, Path::new("x")).is_err());
            assert!(PrivateKey::from_pem(bad, Path::new("x")).is_err());
        }
    }
}
