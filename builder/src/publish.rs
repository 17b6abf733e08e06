//! The repository layout and publishing into it.
//!
//! ```text
//! REPO/
//!   <channel>.json          signed manifest (the only mutable files)
//!   <channel>.json.sig      raw 64-byte Ed25519 signature over <channel>.json
//!   sigs/<sha256>.sig        the same signature, named by the sha256 of the
//!                            manifest bytes it signs: immutable, so a cache
//!                            never pairs a manifest with another's signature
//!   images/<sha256>.squashfs  immutable, content-addressed images
//!   indexes/<sha256>.idx      their chunk indexes (delta updates), also immutable
//!   maps/<sha256>.map         their block maps (incremental builds, static deltas)
//! ```
//!
//! Order on disk: image (temp, fsync, rename) first, then the signatures,
//! then the manifest, so a server never serves a manifest whose image or
//! `sigs/` file is missing. Frontends fetch `sigs/<sha256>.sig` for the
//! manifest bytes they got, so a CDN that caches `<channel>.json` and its
//! `.sig` separately cannot hand them a mismatched pair; `<channel>.json.sig`
//! stays for `openssl pkeyutl -verify` and for older frontends.

use imgdeploy_common::report::one_line;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imgdeploy_common::atomic::{commit_file, create_dir_all_durable, fsync_dir, write_atomic};
use imgdeploy_common::blockmap::{map_path, BlockMap, MAPS_DIR, MAX_MAP_BYTES};
use imgdeploy_common::chunk::{ChunkIndex, ChunkParams};
use imgdeploy_common::digest::{checkpoint_offsets, Checkpoint, Sha256Digest};
use imgdeploy_common::manifest::{
    image_path, index_path, signature_path, validate_channel, BlockMapRef, ImageRef, IndexRef, Manifest, ManifestError,
    Timestamp, FORMAT_VERSION, IMAGES_DIR, INDEXES_DIR, SIGS_DIR,
};
use imgdeploy_common::sign::{PrivateKey, PublicKey};
use imgdeploy_common::trust::{verify_signed, TrustError};
use imgdeploy_common::verity::Verity;
use imgdeploy_common::MAX_MANIFEST_BYTES;

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The repository directory cannot be used.
    #[error("repository {path} is not writable; check the path and its permissions")]
    Repo {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The channel's current manifest cannot be read.
    #[error(
        "existing manifest {path} is unreadable or corrupt ({why}); fix or remove it before publishing to this channel"
    )]
    Existing {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The requested serial would not increase.
    #[error("serial {requested} for channel `{channel}` is not above the published serial {current}; serials must only go up (omit --serial to use {next})", next = current.saturating_add(1))]
    SerialBackwards {
        /// The channel.
        channel: String,
        /// Serial asked for.
        requested: u64,
        /// Serial already published.
        current: u64,
    },
    /// A field is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A manifest in the repository is not signed by the key in use: the
    /// repository was changed outside imgbuild (a bucket, a mirror), so
    /// nothing in it may be signed again.
    #[error("{path} does not verify with the signing key; the repository was changed outside imgbuild: restore it from a trusted copy (or, after a key rotation, pass `--trust OLD.pub`)")]
    Untrusted {
        /// The manifest.
        path: PathBuf,
        /// Why.
        #[source]
        source: TrustError,
    },
    /// A stored image (or chunk index) does not hash to what its manifest signs.
    #[error("{path} does not match the manifest that signs it ({what}); the repository was changed outside imgbuild: restore the file from a trusted copy or rebuild")]
    Tampered {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// The manifest would be expired the moment it is signed.
    #[error("refusing to sign a manifest for `{channel}` that expires at {expires}, which is already past: SOURCE_DATE_EPOCH sets its creation time; unset it for a fresh signature, or pass an --expires-in that reaches past now")]
    AlreadyExpired {
        /// The channel.
        channel: String,
        /// When it would expire.
        expires: Timestamp,
    },
    /// Another publish holds the repository's lock and did not finish in time.
    #[error("another imgbuild is publishing to {path} (its lock {lock} is held); wait for it, or remove a stale lock only if no imgbuild runs")]
    Busy {
        /// The repository.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The channel's serial is at the top of the range.
    #[error("channel `{channel}` has reached the largest serial ({}); publish under a new channel name", u64::MAX)]
    SerialExhausted {
        /// The channel.
        channel: String,
    },
}

/// The repository's publish lock; released when dropped.
#[derive(Debug)]
pub struct RepoLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// A repository directory.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
}

impl Repo {
    /// Opens (creating if needed) the repository at `root` and checks it is writable.
    pub fn open(root: &Path) -> Result<Self, PublishError> {
        let err = |source| PublishError::Repo { path: root.to_owned(), source };
        create_dir_all_durable(&root.join(IMAGES_DIR), 0o755).map_err(err)?;
        let root = fs::canonicalize(root).map_err(err)?;
        // Prove we can create files where we will need to, before hours of compression.
        tempfile::Builder::new().prefix(".tmp-probe").tempfile_in(root.join(IMAGES_DIR)).map_err(err)?;
        tempfile::Builder::new().prefix(".tmp-probe").tempfile_in(&root).map_err(err)?;
        Ok(Self { root })
    }

    /// The repository directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a channel's manifest.
    pub fn manifest_path(&self, channel: &str) -> PathBuf {
        self.root.join(format!("{channel}.json"))
    }

    /// Where images live.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join(IMAGES_DIR)
    }

    /// The serial currently published on `channel` (0 if none), read only
    /// from a manifest whose signature verifies with `trusted`.
    pub fn current_serial(&self, channel: &str, trusted: &[PublicKey]) -> Result<u64, PublishError> {
        Ok(current_manifest(self, channel, trusted)?.map(|m| m.serial).unwrap_or(0))
    }

    /// Takes the repository's publish lock (`.imgbuild.lock`), waiting up
    /// to ten minutes for another publish to finish. Held from reading a
    /// channel's current serial to writing its new manifest, so concurrent
    /// publishes never sign the same serial twice.
    pub fn lock(&self) -> Result<RepoLock, PublishError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.join(".imgbuild.lock");
        let err = |source| PublishError::Repo { path: self.root.clone(), source };
        let mut file =
            fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        let mut told = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(RepoLock { _lock: lock }),
                Err((f, nix::Error::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                    if !told {
                        tracing::info!("waiting for another imgbuild publishing to {}", self.root.display());
                        told = true;
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, nix::Error::EWOULDBLOCK)) => {
                    return Err(PublishError::Busy { path: self.root.clone(), lock: path });
                }
                Err((_, e)) => return Err(err(io::Error::from(e))),
            }
        }
    }

    /// Every channel manifest in the repository, parsed.
    pub fn manifests(&self) -> Result<Vec<(PathBuf, Manifest)>, PublishError> {
        let err = |source| PublishError::Repo { path: self.root.clone(), source };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path.extension().is_some_and(|e| e == "json") && path.is_file() {
                let bytes =
                    fs::read(&path).map_err(|e| PublishError::Existing { path: path.clone(), why: e.to_string() })?;
                let m = parse_own_manifest(&bytes).map_err(|why| PublishError::Existing { path: path.clone(), why })?;
                out.push((path, m));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Parses a manifest in our own repository. The builder trusts its own
/// repository directory (it holds the key); deployers never take this path.
fn parse_own_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!("larger than {MAX_MANIFEST_BYTES} bytes"));
    }
    // Expired manifests are still valid for finding the serial.
    Manifest::parse(bytes).map_err(|e| one_line(&e))
}

/// What to publish.
#[derive(Debug)]
pub struct Release<'a> {
    /// Channel name.
    pub channel: &'a str,
    /// Version label (defaults to `r<serial>`).
    pub version: Option<&'a str>,
    /// Explicit serial; default: current + 1.
    pub serial: Option<u64>,
    /// Creation time of the manifest.
    pub created: Timestamp,
    /// How long the manifest is valid.
    pub expires_in: Duration,
    /// Staged rollout percentage (None: everyone).
    pub rollout: Option<u8>,
}

/// What was published.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    /// Manifest file (absolute).
    pub manifest: PathBuf,
    /// Signature file (absolute).
    pub signature: PathBuf,
    /// Image file (absolute).
    pub image: PathBuf,
    /// Image sha256.
    pub sha256: Sha256Digest,
    /// Chunk index file (absolute).
    pub index: PathBuf,
    /// Number of chunks in the index.
    pub chunks: usize,
    /// Block map file (absolute).
    pub block_map: PathBuf,
    /// Image size.
    pub size: u64,
    /// Channel.
    pub channel: String,
    /// Serial.
    pub serial: u64,
    /// Version label.
    pub version: String,
    /// Manifest creation time.
    pub created: String,
    /// Manifest expiry time.
    pub expires: String,
    /// Id of the signing key.
    pub key_id: String,
}

/// Decides the serial for a release, refusing to go backwards or past the end.
pub fn next_serial(repo: &Repo, release: &Release<'_>, trusted: &[PublicKey]) -> Result<u64, PublishError> {
    let current = repo.current_serial(release.channel, trusted)?;
    match release.serial {
        Some(s) if s <= current => {
            Err(PublishError::SerialBackwards { channel: release.channel.to_owned(), requested: s, current })
        }
        Some(s) => Ok(s),
        None => following_serial(release.channel, current),
    }
}

/// `current + 1`, or an error at the top of the range (never a wrap to 0).
pub fn following_serial(channel: &str, current: u64) -> Result<u64, PublishError> {
    current.checked_add(1).ok_or_else(|| PublishError::SerialExhausted { channel: channel.to_owned() })
}

/// An image stored in the repository, with its chunk index.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The image file (absolute).
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: Sha256Digest,
    /// Its size.
    pub size: u64,
    /// Its published chunk index.
    pub index: IndexRef,
    /// The index file (absolute).
    pub index_file: PathBuf,
    /// Number of chunks.
    pub chunks: usize,
    /// Its published block map.
    pub block_map: BlockMapRef,
    /// The block map file (absolute).
    pub map_file: PathBuf,
    /// Its dm-verity hash tree, appended to the image.
    pub verity: Option<Verity>,
    /// Its SHA-256 state at a few offsets of its data, recorded in the same
    /// read ([`imgdeploy_common::digest::checkpoint_offsets`]).
    pub checkpoints: Vec<Checkpoint>,
}

/// Whether `path` is a regular file of `size` bytes hashing to `sha`.
fn holds(path: &Path, sha: Sha256Digest, size: u64) -> bool {
    let Ok(md) = fs::symlink_metadata(path) else { return false };
    if !md.is_file() || md.len() != size {
        return false;
    }
    // An unreadable file is treated as wrong: it is replaced.
    digest_of_file(path).is_ok_and(|found| found == (sha, size))
}

/// sha256 and length of the file at `path`, read once.
fn digest_of_file(path: &Path) -> io::Result<(Sha256Digest, u64)> {
    Sha256Digest::of_reader(std::io::BufReader::with_capacity(1 << 20, fs::File::open(path)?))
}

/// The keys a repository manifest may be signed with: the signing key's
/// own public half, plus `also` (old keys, for the first publish after a rotation).
pub fn signer_and(key: &PrivateKey, also: &[PublicKey]) -> Vec<PublicKey> {
    std::iter::once(key.public()).chain(also.iter().cloned()).collect()
}

/// Writes a content-addressed file (`dir/<name>`) unless it already holds `bytes`.
fn store_named(repo: &Repo, dir: &str, rel: &str, bytes: &[u8]) -> Result<PathBuf, PublishError> {
    let err = |source| PublishError::Repo { path: repo.root.join(dir), source };
    create_dir_all_durable(&repo.root.join(dir), 0o755).map_err(err)?;
    let file = repo.root.join(rel);
    // A name is kept only when the content matches it: whoever can write to
    // the bucket must not get a rebuild to sign other bytes under it.
    if !holds(&file, Sha256Digest::of_bytes(bytes), bytes.len() as u64) {
        write_atomic(&file, bytes, 0o644).map_err(err)?;
    }
    Ok(file)
}

/// Moves a finished image (a temp file inside the repo's images directory)
/// to its content-addressed name, and publishes its chunk index (computed
/// in the same read of the image) and its block map. `verity` describes the
/// hash tree already appended to the file, if any.
pub fn store_image(
    repo: &Repo,
    tmp: &Path,
    map: &BlockMap,
    verity: Option<Verity>,
) -> Result<StoredImage, PublishError> {
    let err = |source| PublishError::Repo { path: repo.images_dir(), source };
    let reader = std::io::BufReader::with_capacity(1 << 20, fs::File::open(tmp).map_err(err)?);
    // With a hash tree, the data ends on a 4 KiB boundary: deployers check
    // the pieces between checkpoints on every core.
    let at = verity.as_ref().map(|v| checkpoint_offsets(v.hash_offset)).unwrap_or_default();
    let (index, sha, size, checkpoints) =
        ChunkIndex::build_with_checkpoints(reader, ChunkParams::default(), &at).map_err(err)?;
    let encoded = index.encode();
    let index_sha = Sha256Digest::of_bytes(&encoded);
    let index_ref = IndexRef { path: index_path(&index_sha), sha256: index_sha, size: encoded.len() as u64 };
    let index_file = store_named(repo, INDEXES_DIR, &index_ref.path, &encoded)?;
    let map_bytes = map.encode();
    let map_sha = Sha256Digest::of_bytes(&map_bytes);
    let block_map = BlockMapRef { path: map_path(&map_sha), sha256: map_sha, size: map_bytes.len() as u64 };
    let map_file = store_named(repo, MAPS_DIR, &block_map.path, &map_bytes)?;
    let dest = repo.root.join(image_path(&sha));
    if holds(&dest, sha, size) {
        // Same bytes already published (content addressing): keep the old file,
        // whose mtime caches may rely on.
        fs::remove_file(tmp).map_err(err)?;
        fsync_dir(&repo.images_dir()).map_err(err)?;
    } else {
        if dest.exists() {
            tracing::warn!("{} did not hold the bytes its name says; replacing it", dest.display());
        }
        commit_file(tmp, &dest).map_err(err)?;
    }
    Ok(StoredImage {
        path: dest,
        sha256: sha,
        size,
        index: index_ref,
        index_file,
        chunks: index.chunks.len(),
        block_map,
        map_file,
        verity,
        checkpoints,
    })
}

/// The images the repository's channels currently serve, with their block
/// maps, for an incremental build to copy blocks from. Only what a
/// manifest signed by `trusted` names is used, and only when its map has
/// the signed sha256; anything missing or wrong is left out with a note,
/// never an error (the build then compresses those blocks itself).
pub fn earlier_images(repo: &Repo, trusted: &[PublicKey]) -> Vec<crate::blocks::Source> {
    let manifests = match repo.manifests() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("not reusing earlier images: {}", one_line(&e));
            return Vec::new();
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut sources = Vec::new();
    for (path, _) in manifests {
        let Some(channel) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        let m = match current_manifest(repo, channel, trusted) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("not reusing channel `{channel}`'s image: {}", one_line(&e));
                continue;
            }
        };
        if !seen.insert(m.image.sha256) {
            continue;
        }
        let Some(r) = &m.block_map else {
            tracing::info!("not reusing channel `{channel}`'s image: it was built without a block map");
            continue;
        };
        let image = repo.root.join(&m.image.path);
        match load_map(&repo.root.join(&r.path), r)
            .and_then(|map| crate::blocks::open_source(&image, map, m.image.size, m.image.data_size()))
        {
            Ok(s) => sources.push(s),
            Err(e) => tracing::warn!("not reusing {} (channel `{channel}`): {e}", image.display()),
        }
    }
    sources
}

/// Reads a block map that must be the one `r` signs.
pub(crate) fn load_map(path: &Path, r: &BlockMapRef) -> io::Result<BlockMap> {
    let bad =
        |why: String| io::Error::new(io::ErrorKind::InvalidData, format!("its block map {}: {why}", path.display()));
    let file = fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_MAP_BYTES as u64 + 1), &mut bytes)?;
    let found = (bytes.len() as u64, Sha256Digest::of_bytes(&bytes));
    if found != (r.size, r.sha256) {
        return Err(bad(format!(
            "{} bytes with sha256 {}, signed: {} bytes with sha256 {}",
            found.0, found.1, r.size, r.sha256
        )));
    }
    BlockMap::decode(&bytes).map_err(|e| bad(e.to_string()))
}

/// Refuses a manifest that would already be expired when signed (an old
/// SOURCE_DATE_EPOCH): deployers would refuse it, and it must not be
/// mistaken for a working publish.
pub fn check_not_expired(channel: &str, expires: Timestamp) -> Result<(), PublishError> {
    if expires <= Timestamp::now() {
        return Err(PublishError::AlreadyExpired { channel: channel.to_owned(), expires });
    }
    Ok(())
}

/// Validates, signs and writes `manifest` as its channel's manifest:
/// signature first, then the manifest, each atomically.
pub fn sign_and_write(repo: &Repo, key: &PrivateKey, manifest: &Manifest) -> Result<(PathBuf, PathBuf), PublishError> {
    manifest.validate()?;
    check_not_expired(&manifest.channel, manifest.expires)?;
    let bytes = manifest.to_bytes();
    let sig = key.sign(&bytes);
    let manifest_path = repo.manifest_path(&manifest.channel);
    let sig_path = repo.root.join(format!("{}.json.sig", manifest.channel));
    let err = |source| PublishError::Repo { path: repo.root.clone(), source };
    create_dir_all_durable(&repo.root.join(SIGS_DIR), 0o755).map_err(err)?;
    write_atomic(&repo.root.join(signature_path(&Sha256Digest::of_bytes(&bytes))), &sig, 0o644).map_err(err)?;
    write_atomic(&sig_path, &sig, 0o644).map_err(err)?;
    write_atomic(&manifest_path, &bytes, 0o644).map_err(err)?;
    Ok((manifest_path, sig_path))
}

/// The channel's current manifest (None if the channel has none), only if
/// its signature verifies with `trusted`: what CI signs again must be what
/// CI signed, never what someone with write access to the bucket put there.
pub fn current_manifest(repo: &Repo, channel: &str, trusted: &[PublicKey]) -> Result<Option<Manifest>, PublishError> {
    let path = repo.manifest_path(channel);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PublishError::Existing { path, why: e.to_string() }),
    };
    parse_own_manifest(&bytes).map_err(|why| PublishError::Existing { path: path.clone(), why })?;
    // As frontends do: the signature named by these bytes, else `.json.sig`.
    let by_digest = repo.root.join(signature_path(&Sha256Digest::of_bytes(&bytes)));
    let sig_path = if by_digest.is_file() { by_digest } else { repo.root.join(format!("{channel}.json.sig")) };
    let sig = fs::read(&sig_path).map_err(|e| PublishError::Existing { path: sig_path, why: e.to_string() })?;
    // Expired manifests still count: they hold the serial to continue from.
    verify_signed(&bytes, &sig, trusted)
        .map(|v| Some(v.manifest))
        .map_err(|source| PublishError::Untrusted { path, source })
}

/// Checks that the repository's copy of `m`'s image (and chunk index)
/// hashes to what `m` signs, before anything signs it again.
///
/// A file that is not in the local copy at all is not an error: CI jobs copy
/// the repository without its (large) images, and what is re-signed is the
/// sha256 the verified manifest names, which every frontend checks.
pub fn verify_stored(repo: &Repo, m: &Manifest) -> Result<(), PublishError> {
    let check = |rel: &str, sha: Sha256Digest, size: u64| {
        let path = repo.root.join(rel);
        if !path.exists() {
            tracing::info!(
                "{} is not in the local copy of the repository; re-signing its signed sha256 {sha}",
                path.display()
            );
            return Ok(());
        }
        let (found, len) =
            digest_of_file(&path).map_err(|e| PublishError::Tampered { path: path.clone(), what: e.to_string() })?;
        if (found, len) != (sha, size) {
            return Err(PublishError::Tampered {
                path,
                what: format!("{len} bytes with sha256 {found}, signed: {size} bytes with sha256 {sha}"),
            });
        }
        Ok(())
    };
    check(&m.image.path, m.image.sha256, m.image.size)?;
    if let Some(i) = &m.index {
        check(&i.path, i.sha256, i.size)?;
    }
    if let Some(b) = &m.block_map {
        check(&b.path, b.sha256, b.size)?;
    }
    Ok(())
}

/// Signs and writes the manifest for an image already stored in the repo.
pub fn publish_manifest(
    repo: &Repo,
    key: &PrivateKey,
    release: &Release<'_>,
    serial: u64,
    image: &StoredImage,
    deltas: Vec<imgdeploy_common::manifest::DeltaRef>,
) -> Result<Published, PublishError> {
    validate_channel(release.channel)?;
    let version = release.version.map(str::to_owned).unwrap_or_else(|| format!("r{serial}"));
    let (image_file, sha256, size) = (&image.path, image.sha256, image.size);
    let manifest = Manifest {
        format: FORMAT_VERSION,
        channel: release.channel.to_owned(),
        serial,
        version: version.clone(),
        created: release.created,
        expires: release.created.plus(release.expires_in),
        image: ImageRef {
            path: image_path(&sha256),
            sha256,
            size,
            format: imgdeploy_common::manifest::ImageFormat::Squashfs,
            compression: "zstd".into(),
            verity: image.verity.clone(),
            checkpoints: image.checkpoints.clone(),
        },
        index: Some(image.index.clone()),
        rollout: release.rollout,
        block_map: Some(image.block_map.clone()),
        deltas,
    };
    let (manifest_path, sig_path) = sign_and_write(repo, key, &manifest)?;
    Ok(Published {
        manifest: manifest_path,
        signature: sig_path,
        image: image_file.to_owned(),
        sha256,
        index: image.index_file.clone(),
        chunks: image.chunks,
        block_map: image.map_file.clone(),
        size,
        channel: manifest.channel,
        serial,
        version,
        created: manifest.created.to_string(),
        expires: manifest.expires.to_string(),
        key_id: key.public().id(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_only_go_up() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open(&d.path().join("repo")).unwrap();
        let key = PrivateKey::generate().unwrap();
        let rel = |serial| Release {
            channel: "stable",
            version: None,
            serial,
            created: Timestamp::now(),
            expires_in: Duration::from_secs(60),
            rollout: None,
        };
        let trusted = [key.public()];
        assert_eq!(next_serial(&repo, &rel(None), &trusted).unwrap(), 1);
        let tmp = repo.images_dir().join(".tmp-x");
        fs::write(&tmp, b"image bytes").unwrap();
        let map = BlockMap {
            compressor: imgdeploy_common::compress::Compressor::identity(15),
            block_size: 131072,
            image_size: 11,
            blocks: vec![],
            files: vec![],
        };
        let stored = store_image(&repo, &tmp, &map, None).unwrap();
        assert!(stored.index_file.exists());
        assert_eq!(BlockMap::decode(&fs::read(&stored.map_file).unwrap()).unwrap(), map);
        let published = publish_manifest(&repo, &key, &rel(None), 5, &stored, Vec::new()).unwrap();
        assert_eq!(published.version, "r5");
        assert_eq!(next_serial(&repo, &rel(None), &trusted).unwrap(), 6);
        assert!(matches!(
            next_serial(&repo, &rel(Some(5)), &trusted),
            Err(PublishError::SerialBackwards { current: 5, .. })
        ));
        assert_eq!(next_serial(&repo, &rel(Some(9)), &trusted).unwrap(), 9);
        let sig = fs::read(&published.signature).unwrap();
        key.public().verify(&fs::read(&published.manifest).unwrap(), &sig).unwrap();
        // Another key's manifest is not ours to continue from.
        let other = [PrivateKey::generate().unwrap().public()];
        assert!(matches!(next_serial(&repo, &rel(None), &other), Err(PublishError::Untrusted { .. })));
        verify_stored(&repo, &current_manifest(&repo, "stable", &trusted).unwrap().unwrap()).unwrap();
        fs::write(&stored.path, b"other bytes").unwrap();
        let m = current_manifest(&repo, "stable", &trusted).unwrap().unwrap();
        assert!(matches!(verify_stored(&repo, &m), Err(PublishError::Tampered { .. })));
        assert!(matches!(following_serial("stable", u64::MAX), Err(PublishError::SerialExhausted { .. })));
        assert_eq!(following_serial("stable", u64::MAX - 1).unwrap(), u64::MAX);
        fs::write(&published.manifest, b"garbage").unwrap();
        assert!(matches!(next_serial(&repo, &rel(None), &trusted), Err(PublishError::Existing { .. })));
    }
}
