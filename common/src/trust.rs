//! Accepting a manifest: the one path from untrusted bytes to a [`Manifest`].
//!
//! Order matters and is fixed here: the signature is checked over the raw
//! bytes first, and only then are the bytes parsed (we never run a JSON parser
//! on unauthenticated input), then the expiry is checked against the clock.

use crate::manifest::{Manifest, ManifestError, Timestamp};
use crate::sign::{verify_any, KeyError, PublicKey};

/// Why a signed manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The signature did not verify.
    #[error(transparent)]
    Signature(#[from] KeyError),
    /// The signed bytes are not a valid manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest's expiry time has passed.
    #[error("manifest for channel `{channel}` (serial {serial}) expired at {expires}; the publisher must re-sign it (`imgbuild build` or `imgbuild refresh`), or the host clock is wrong")]
    Expired {
        /// Channel.
        channel: String,
        /// Serial.
        serial: u64,
        /// Its expiry time.
        expires: Timestamp,
    },
}

/// A manifest whose signature, contents and expiry were checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// Id of the key that signed it.
    pub key_id: String,
}

/// Verifies `signature` over `bytes` with one of `trusted`, then parses and
/// validates the manifest. Does not look at the clock: for manifests already
/// installed on a host, whose expiry only mattered when they were fetched.
pub fn verify_signed(bytes: &[u8], signature: &[u8], trusted: &[PublicKey]) -> Result<VerifiedManifest, TrustError> {
    let key = verify_any(trusted, bytes, signature)?;
    let manifest = Manifest::parse(bytes)?;
    Ok(VerifiedManifest { manifest, key_id: key.id() })
}

/// Verifies `signature` over `bytes` with one of `trusted`, then parses and
/// validates the manifest, then checks it has not expired at `now`.
pub fn verify_manifest(
    bytes: &[u8],
    signature: &[u8],
    trusted: &[PublicKey],
    now: Timestamp,
) -> Result<VerifiedManifest, TrustError> {
    let VerifiedManifest { manifest, key_id } = verify_signed(bytes, signature, trusted)?;
    if manifest.expires <= now {
        return Err(TrustError::Expired {
            channel: manifest.channel,
            serial: manifest.serial,
            expires: manifest.expires,
        });
    }
    Ok(VerifiedManifest { manifest, key_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::sign::PrivateKey;

    #[test]
    fn accepts_good_and_refuses_each_defect() {
        let key = PrivateKey::generate().unwrap();
        let trusted = [key.public()];
        let m = sample();
        let bytes = m.to_bytes();
        let sig = key.sign(&bytes);
        let now = Timestamp(m.created.0 + 1);
        let ok = verify_manifest(&bytes, &sig, &trusted, now).unwrap();
        assert_eq!(ok.manifest, m);

        // One flipped bit anywhere in the manifest or the signature is refused.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(matches!(verify_manifest(&b, &sig, &trusted, now), Err(TrustError::Signature(_))), "byte {i}");
        }
        for i in 0..sig.len() {
            let mut s = sig;
            s[i] ^= 0x80;
            assert!(verify_manifest(&bytes, &s, &trusted, now).is_err(), "sig byte {i}");
        }
        assert!(matches!(
            verify_manifest(&bytes, &sig, &trusted, m.expires),
            Err(TrustError::Expired { serial: 7, .. })
        ));
        let other = PrivateKey::generate().unwrap();
        assert!(verify_manifest(&bytes, &sig, &[other.public()], now).is_err());
        // A correctly signed but invalid manifest is refused after the signature check.
        let junk = b"{\"format\":1}";
        assert!(matches!(verify_manifest(junk, &key.sign(junk), &trusted, now), Err(TrustError::Manifest(_))));
    }
}
