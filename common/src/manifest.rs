//! The channel manifest: the small signed JSON document that names the image
//! a channel currently serves. Everything a deployer acts on is in here, and
//! so under the signature: channel, serial (anti-rollback), expiry
//! (anti-freeze), and the image's path, size and sha256.
//!
//! Parsing is strict: unknown fields are refused, because a field an old
//! deployer silently ignored would be an unsigned decision in practice.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

/// The manifest format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Directory, relative to the manifest, that holds the content-addressed images.
pub const IMAGES_DIR: &str = "images";
/// File name suffix of an image.
pub const IMAGE_SUFFIX: &str = ImageFormat::Squashfs.suffix();

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("manifest is not valid")]
    Syntax(#[source] serde_json::Error),
    /// Written by a newer builder.
    #[error(
        "manifest format {found} is not supported (this imgdeploy reads format {FORMAT_VERSION}); upgrade imgdeploy"
    )]
    Format {
        /// The version found.
        found: u32,
    },
    /// A field's value is not allowed.
    #[error("manifest field `{field}` is invalid: {why}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// A point in time, whole seconds since the Unix epoch, written as RFC 3339 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// This time plus `d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d.as_secs()))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = UNIX_EPOCH + Duration::from_secs(self.0);
        write!(f, "{}", humantime::format_rfc3339_seconds(t))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = humantime::parse_rfc3339(&s)
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not an RFC 3339 UTC time: {e}")))?;
        Ok(Self::from(t))
    }
}

/// The most checkpoints a manifest may list (the builder writes at most
/// [`crate::digest::CHECKPOINTS`]).
pub const MAX_CHECKPOINTS: usize = 64;

/// Where the image is and what it must hash to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Path relative to the manifest's directory: `images/<sha256>.squashfs`.
    pub path: String,
    /// SHA-256 of the whole image file.
    pub sha256: Sha256Digest,
    /// Exact size of the image file in bytes.
    pub size: u64,
    /// Filesystem format.
    pub format: ImageFormat,
    /// Compressor inside the filesystem; always `zstd`.
    pub compression: String,
    /// The dm-verity hash tree appended to the image (absent: images built
    /// before hash trees, checked at install only). See [`crate::verity`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<crate::verity::Verity>,
    /// The SHA-256 state of the image at a few offsets in its data, the
    /// last at the data's end, so that a deployer checks `sha256` on every
    /// core ([`crate::digest::Checkpoint`]). Absent: images built before
    /// them, checked on one core.
    #[serde(default, rename = "sha256_checkpoints", skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<crate::digest::Checkpoint>,
}

impl ImageRef {
    /// Checkpoints must be few, increasing, on 4 KiB boundaries (a
    /// dm-verity block; a direct read), and inside the data.
    fn validate_checkpoints(&self) -> Result<(), ManifestError> {
        let bad = |why: String| Err(ManifestError::Field { field: "image.sha256_checkpoints", why });
        if self.checkpoints.len() > MAX_CHECKPOINTS {
            return bad(format!("{} are more than {MAX_CHECKPOINTS}", self.checkpoints.len()));
        }
        let mut after = 0;
        for c in &self.checkpoints {
            if c.at <= after || c.at % 4096 != 0 || c.at > self.data_size() {
                return bad(format!(
                    "offset {} is not a multiple of 4096 after {after} and within the image's {} bytes of data",
                    c.at,
                    self.data_size()
                ));
            }
            after = c.at;
        }
        Ok(())
    }

    /// Bytes of the file that are the filesystem: all of it, or what comes
    /// before the dm-verity superblock and tree.
    pub fn data_size(&self) -> u64 {
        self.verity.as_ref().map_or(self.size, |v| v.hash_offset)
    }
}

/// The filesystem an image holds. One variant today; a new one makes the
/// compiler list every place that must handle it (file name, mount type,
/// superblock check, kernel modules, builder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A squashfs image (zstd-compressed).
    Squashfs,
}

impl ImageFormat {
    /// The file name suffix of images of this format, in the repository and in slots.
    pub const fn suffix(self) -> &'static str {
        match self {
            ImageFormat::Squashfs => ".squashfs",
        }
    }

    /// The filesystem type given to mount(2).
    pub const fn fstype(self) -> &'static str {
        match self {
            ImageFormat::Squashfs => "squashfs",
        }
    }

    /// The kernel module that reads it.
    pub const fn kernel_module(self) -> &'static str {
        match self {
            ImageFormat::Squashfs => "squashfs",
        }
    }

    /// Checks that `image` (of `len` bytes) starts with a header of this
    /// format that the kernel can mount and that fits in the file.
    pub fn check_header(self, image: &std::fs::File, len: u64) -> Result<(), HeaderError> {
        use std::os::unix::fs::FileExt;
        match self {
            ImageFormat::Squashfs => {
                let mut head = [0u8; crate::squashfs::SUPERBLOCK_BYTES];
                image.read_exact_at(&mut head, 0).map_err(HeaderError::Read)?;
                crate::squashfs::Superblock::parse(&head)
                    .and_then(|sb| sb.check_size(len))
                    .map_err(HeaderError::Squashfs)
            }
        }
    }
}

/// Why an image's header is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// It could not be read.
    #[error("its header cannot be read")]
    Read(#[source] std::io::Error),
    /// The squashfs superblock is invalid or claims more than the file holds.
    #[error("is not a usable squashfs image")]
    Squashfs(#[source] crate::squashfs::SuperblockError),
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.fstype())
    }
}

/// Where the image's chunk index is (see [`crate::chunk`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRef {
    /// Path relative to the manifest's directory: `indexes/<sha256>.idx`.
    pub path: String,
    /// SHA-256 of the (compressed) index file.
    pub sha256: Sha256Digest,
    /// Size of the index file.
    pub size: u64,
}

/// A channel manifest (format 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version, [`FORMAT_VERSION`].
    pub format: u32,
    /// The channel this manifest was published to, e.g. `stable`.
    pub channel: String,
    /// Increases with every publish to the channel; deployers refuse to go back.
    pub serial: u64,
    /// Human version label.
    pub version: String,
    /// When the manifest was signed.
    pub created: Timestamp,
    /// After this time deployers refuse the manifest.
    pub expires: Timestamp,
    /// The image.
    pub image: ImageRef,
    /// The image's chunk index, for delta updates (absent: full downloads only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexRef>,
    /// Staged rollout: the percentage of hosts (0-100) that should take this
    /// image (absent: all). See [`crate::rollout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<u8>,
    /// The image's block map, for incremental builds and static deltas
    /// (absent: images built before block maps). See [`crate::blockmap`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_map: Option<BlockMapRef>,
    /// Static deltas to this image from earlier ones (see [`crate::sdelta`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaRef>,
}

/// Most static deltas one manifest lists.
pub const MAX_DELTAS: usize = 16;

/// A static delta that makes the manifest's image from an earlier image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaRef {
    /// sha256 of the image it starts from.
    pub from: Sha256Digest,
    /// That image's block map, so the next build can make its delta from
    /// the same image.
    pub from_map: BlockMapRef,
    /// `deltas/<from>-<to>.delta`.
    pub path: String,
    /// SHA-256 of the delta file.
    pub sha256: Sha256Digest,
    /// Size of the delta file (less than the image's: a larger one is not published).
    pub size: u64,
}

/// Where the image's block map is (see [`crate::blockmap`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockMapRef {
    /// Path relative to the manifest's directory: `maps/<sha256>.map`.
    pub path: String,
    /// SHA-256 of the (compressed) map file.
    pub sha256: Sha256Digest,
    /// Size of the map file.
    pub size: u64,
}

impl BlockMapRef {
    fn validate(&self, path: &'static str, size: &'static str) -> Result<(), ManifestError> {
        let want = crate::blockmap::map_path(&self.sha256);
        if self.path != want {
            return Err(ManifestError::Field { field: path, why: format!("`{}` must be `{want}`", self.path) });
        }
        if self.size == 0 || self.size > crate::blockmap::MAX_MAP_BYTES as u64 {
            return Err(ManifestError::Field { field: size, why: format!("{} is out of range", self.size) });
        }
        Ok(())
    }
}

/// The relative path an image with this digest is published under.
pub fn image_path(sha256: &Sha256Digest) -> String {
    format!("{IMAGES_DIR}/{sha256}{IMAGE_SUFFIX}")
}

/// Directory of the chunk indexes.
pub const INDEXES_DIR: &str = "indexes";

/// The relative path an index with this digest is published under.
pub fn index_path(sha256: &Sha256Digest) -> String {
    format!("{INDEXES_DIR}/{sha256}.idx")
}

/// Directory of the static deltas.
pub const DELTAS_DIR: &str = "deltas";

/// The relative path of the static delta from image `from` to image `to`.
pub fn delta_path(from: &Sha256Digest, to: &Sha256Digest) -> String {
    format!("{DELTAS_DIR}/{from}-{to}.delta")
}

/// Directory of the signatures named by what they sign.
pub const SIGS_DIR: &str = "sigs";

/// The relative path of the signature over manifest bytes with this digest:
/// `sigs/<sha256 of the manifest>.sig`. Unlike `<channel>.json.sig` it never
/// changes once written, so a cache can never pair it with other bytes.
pub fn signature_path(manifest_sha256: &Sha256Digest) -> String {
    format!("{SIGS_DIR}/{manifest_sha256}.sig")
}

/// Checks a channel name: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_channel(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::Field {
            field: "channel",
            why: format!(
                "`{name}` must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
            ),
        })
    }
}

/// Checks a version label: 1 to 128 printable characters, no control characters.
pub fn validate_version(label: &str) -> Result<(), ManifestError> {
    if label.is_empty() || label.chars().count() > 128 || label.chars().any(char::is_control) {
        return Err(ManifestError::Field {
            field: "version",
            why: "must be 1-128 characters with no control characters".into(),
        });
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates manifest bytes. Call only on bytes whose
    /// signature has been verified (see [`crate::trust`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        // Read the format first so a newer manifest gets "upgrade" rather than
        // a confusing complaint about an unknown field.
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u32,
        }
        if let Ok(f) = serde_json::from_slice::<FormatOnly>(bytes) {
            if f.format != FORMAT_VERSION {
                return Err(ManifestError::Format { found: f.format });
            }
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(ManifestError::Syntax)?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every field's value.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::Format { found: self.format });
        }
        validate_channel(&self.channel)?;
        validate_version(&self.version)?;
        if self.serial == 0 {
            return Err(ManifestError::Field { field: "serial", why: "must be at least 1".into() });
        }
        if self.expires <= self.created {
            return Err(ManifestError::Field { field: "expires", why: "must be after `created`".into() });
        }
        let want = image_path(&self.image.sha256);
        if self.image.path != want {
            return Err(ManifestError::Field {
                field: "image.path",
                why: format!("`{}` must be `{want}` (content-addressed by its sha256)", self.image.path),
            });
        }
        if self.image.compression != "zstd" {
            return Err(ManifestError::Field {
                field: "image.compression",
                why: format!("`{}` is not `zstd`", self.image.compression),
            });
        }
        if self.image.size == 0 {
            return Err(ManifestError::Field { field: "image.size", why: "must not be 0".into() });
        }
        if let Some(v) = &self.image.verity {
            v.validate(self.image.size).map_err(|e| ManifestError::Field { field: e.field, why: e.why })?;
        }
        self.image.validate_checkpoints()?;
        if self.rollout.is_some_and(|p| p > 100) {
            return Err(ManifestError::Field { field: "rollout", why: "must be a percentage from 0 to 100".into() });
        }
        if let Some(idx) = &self.index {
            let want = index_path(&idx.sha256);
            if idx.path != want {
                return Err(ManifestError::Field {
                    field: "index.path",
                    why: format!("`{}` must be `{want}`", idx.path),
                });
            }
            if idx.size == 0 || idx.size > crate::chunk::MAX_INDEX_BYTES as u64 {
                return Err(ManifestError::Field { field: "index.size", why: format!("{} is out of range", idx.size) });
            }
        }
        if let Some(map) = &self.block_map {
            map.validate("block_map.path", "block_map.size")?;
        }
        if self.deltas.len() > MAX_DELTAS {
            return Err(ManifestError::Field {
                field: "deltas",
                why: format!("{} deltas, at most {MAX_DELTAS}", self.deltas.len()),
            });
        }
        let mut froms = std::collections::HashSet::new();
        for d in &self.deltas {
            let want = delta_path(&d.from, &self.image.sha256);
            if d.path != want {
                return Err(ManifestError::Field {
                    field: "deltas.path",
                    why: format!("`{}` must be `{want}`", d.path),
                });
            }
            if d.from == self.image.sha256 || !froms.insert(d.from) {
                return Err(ManifestError::Field {
                    field: "deltas.from",
                    why: format!("{} is the image itself or listed twice", d.from),
                });
            }
            if d.size == 0 || d.size >= self.image.size {
                return Err(ManifestError::Field { field: "deltas.size", why: format!("{} is out of range", d.size) });
            }
            d.from_map.validate("deltas.from_map.path", "deltas.from_map.size")?;
        }
        Ok(())
    }

    /// The exact bytes that get signed and published: pretty JSON in field
    /// order with a trailing newline, so the same manifest always has the same bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_header_check_refuses_what_the_kernel_could_not_mount() {
        let dir = tempfile::tempdir().unwrap();
        let file = |bytes: &[u8]| {
            let p = dir.path().join("img");
            std::fs::write(&p, bytes).unwrap();
            std::fs::File::open(&p).unwrap()
        };
        let check = |bytes: &[u8]| ImageFormat::Squashfs.check_header(&file(bytes), bytes.len() as u64);
        assert!(matches!(check(b"hsqs"), Err(HeaderError::Read(_))));
        let e = check(&[0u8; 4096]).unwrap_err();
        assert!(matches!(e, HeaderError::Squashfs(crate::squashfs::SuperblockError::Magic(0))), "{e:?}");
        assert_eq!(e.to_string(), "is not a usable squashfs image");
    }

    /// What each format means to the kernel and on disk, and its JSON name.
    #[test]
    fn image_formats() {
        let f = ImageFormat::Squashfs;
        assert_eq!((f.suffix(), f.fstype(), f.kernel_module()), (".squashfs", "squashfs", "squashfs"));
        assert_eq!(f.to_string(), "squashfs");
        assert_eq!(serde_json::to_string(&f).unwrap(), "\"squashfs\"");
        assert!(serde_json::from_str::<ImageFormat>("\"erofs\"").is_err());
    }

    #[test]
    fn repository_paths() {
        let sha = Sha256Digest::of_bytes(b"x");
        assert_eq!(image_path(&sha), format!("images/{sha}.squashfs"));
        assert_eq!(index_path(&sha), format!("indexes/{sha}.idx"));
        assert_eq!(signature_path(&sha), format!("sigs/{sha}.sig"));
    }

    #[test]
    fn rollout_and_index_size_bounds() {
        let with = |rollout: Option<u8>, index_size: u64| {
            let mut m = sample();
            m.rollout = rollout;
            let sha = Sha256Digest::of_bytes(b"idx");
            m.index = Some(IndexRef { path: index_path(&sha), sha256: sha, size: index_size });
            m.validate()
        };
        assert!(with(Some(100), 1).is_ok());
        assert!(with(Some(0), crate::chunk::MAX_INDEX_BYTES as u64).is_ok());
        assert!(matches!(with(Some(101), 1), Err(ManifestError::Field { field: "rollout", .. })));
        assert!(matches!(with(None, 0), Err(ManifestError::Field { field: "index.size", .. })));
        let over = crate::chunk::MAX_INDEX_BYTES as u64 + 1;
        assert!(matches!(with(None, over), Err(ManifestError::Field { field: "index.size", .. })));
    }

    #[test]
    fn deltas_are_named_by_both_images_and_bounded() {
        let m0 = sample();
        let map_sha = Sha256Digest::of_bytes(b"map");
        let delta = |from: &[u8], size: u64| {
            let from = Sha256Digest::of_bytes(from);
            DeltaRef {
                from,
                from_map: BlockMapRef { path: crate::blockmap::map_path(&map_sha), sha256: map_sha, size: 9 },
                path: delta_path(&from, &m0.image.sha256),
                sha256: Sha256Digest::of_bytes(b"delta"),
                size,
            }
        };
        let with = |deltas: Vec<DeltaRef>| {
            let mut m = sample();
            m.deltas = deltas;
            m.validate()
        };
        let field = |r: Result<(), ManifestError>| match r {
            Err(ManifestError::Field { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(with(vec![delta(b"a", 1), delta(b"b", 4095)]).is_ok());
        let m = Manifest { deltas: vec![delta(b"a", 100)], ..sample() };
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m, "round trip");
        assert!(!String::from_utf8(sample().to_bytes()).unwrap().contains("deltas"), "none: not written");
        assert_eq!(field(with(vec![delta(b"a", 0)])), "deltas.size");
        assert_eq!(field(with(vec![delta(b"a", 4096)])), "deltas.size", "not smaller than the image");
        assert_eq!(field(with(vec![delta(b"a", 1), delta(b"a", 2)])), "deltas.from", "listed twice");
        assert_eq!(field(with(vec![delta(b"image", 1)])), "deltas.from", "from the image itself");
        let mut d = delta(b"a", 1);
        d.path = delta_path(&m0.image.sha256, &d.from);
        assert_eq!(field(with(vec![d])), "deltas.path", "the two images swapped");
        let mut d = delta(b"a", 1);
        d.from_map.size = 0;
        assert_eq!(field(with(vec![d])), "deltas.from_map.size");
        let mut d = delta(b"a", 1);
        d.from_map.path = "maps/x.map".into();
        assert_eq!(field(with(vec![d])), "deltas.from_map.path");
        let many = (0..=MAX_DELTAS as u8).map(|i| delta(&[i], 1)).collect();
        assert_eq!(field(with(many)), "deltas");
        let most = (0..MAX_DELTAS as u8).map(|i| delta(&[i], 1)).collect();
        assert!(with(most).is_ok());
    }

    #[test]
    fn block_map_path_and_size_bounds() {
        let sha = Sha256Digest::of_bytes(b"map");
        let with = |path: String, size: u64| {
            let mut m = sample();
            m.block_map = Some(BlockMapRef { path, sha256: sha, size });
            m.validate()
        };
        let good = crate::blockmap::map_path(&sha);
        assert!(with(good.clone(), 1).is_ok());
        assert!(with(good.clone(), crate::blockmap::MAX_MAP_BYTES as u64).is_ok());
        let other = crate::blockmap::map_path(&Sha256Digest::of_bytes(b"other"));
        assert!(matches!(with(other, 1), Err(ManifestError::Field { field: "block_map.path", .. })));
        assert!(matches!(with(good.clone(), 0), Err(ManifestError::Field { field: "block_map.size", .. })));
        let over = crate::blockmap::MAX_MAP_BYTES as u64 + 1;
        assert!(matches!(with(good, over), Err(ManifestError::Field { field: "block_map.size", .. })));
        // It round-trips through the signed bytes.
        let mut m = sample();
        m.block_map = Some(BlockMapRef { path: crate::blockmap::map_path(&sha), sha256: sha, size: 7 });
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn checkpoints_are_few_increasing_block_aligned_and_inside_the_data() {
        use crate::digest::Checkpoint;
        let cp = |at: u64| Checkpoint { at, state: Sha256Digest::of_bytes(&at.to_le_bytes()) };
        let with = |ats: &[u64]| {
            let mut m = sample();
            m.image.size = 1 << 30;
            m.image.checkpoints = ats.iter().map(|&a| cp(a)).collect();
            m.validate()
        };
        let field = |r: Result<(), ManifestError>| match r {
            Err(ManifestError::Field { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(with(&[]).is_ok());
        assert!(with(&[4096, 8192, 1 << 30]).is_ok(), "up to the data's end");
        let many: Vec<u64> = (1..=MAX_CHECKPOINTS as u64).map(|k| k * 4096).collect();
        assert!(with(&many).is_ok());
        let too_many: Vec<u64> = (1..=MAX_CHECKPOINTS as u64 + 1).map(|k| k * 4096).collect();
        for bad in [&too_many[..], &[0], &[4096, 4096], &[8192, 4096], &[4096 + 64], &[(1 << 30) + 4096]] {
            assert_eq!(field(with(bad)), "image.sha256_checkpoints", "{:?}", &bad[..bad.len().min(3)]);
        }
        // Inside the data: not into the hash tree.
        let mut m = sample();
        m.image.size = 3 * 1024 * 1024;
        m.image.verity = Some(verity_at(2 * 1024 * 1024));
        m.image.checkpoints = vec![cp(2 * 1024 * 1024 + 4096)];
        assert!(m.image.validate_checkpoints().unwrap_err().to_string().contains("2097152 bytes of data"));
        m.image.checkpoints = vec![cp(2 * 1024 * 1024)];
        assert!(m.image.validate_checkpoints().is_ok());
        // They round-trip through the signed bytes, under their JSON name.
        let mut m = sample();
        m.image.checkpoints = vec![cp(4096)];
        let json: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        assert_eq!(json["image"]["sha256_checkpoints"][0]["at"], 4096);
        assert_eq!(json["image"]["sha256_checkpoints"][0]["state"], cp(4096).state.to_string());
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn version_labels() {
        for good in ["a", "v1.2 (build 7)", &"é".repeat(128)] {
            assert!(validate_version(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a\nb", "tab\there", &"é".repeat(129)] {
            assert!(validate_version(bad).is_err(), "{bad:?}");
        }
    }

    /// A tree whose data ends at `hash_offset`.
    fn verity_at(hash_offset: u64) -> crate::verity::Verity {
        crate::verity::Verity {
            root_hash: Sha256Digest::of_bytes(b"root"),
            salt: Sha256Digest::of_bytes(b"salt"),
            hash_offset,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash: crate::verity::HASH.into(),
        }
    }

    pub(crate) fn sample() -> Manifest {
        let sha = Sha256Digest::of_bytes(b"image");
        Manifest {
            format: FORMAT_VERSION,
            channel: "stable".into(),
            serial: 7,
            version: "2026.11.25".into(),
            created: Timestamp(1_700_000_000),
            expires: Timestamp(1_700_000_000 + 30 * 86400),
            image: ImageRef {
                path: image_path(&sha),
                sha256: sha,
                size: 4096,
                format: ImageFormat::Squashfs,
                compression: "zstd".into(),
                verity: None,
                checkpoints: Vec::new(),
            },
            index: None,
            rollout: None,
            block_map: None,
            deltas: Vec::new(),
        }
    }

    /// The filesystem is the whole file without a hash tree, and only what
    /// precedes the verity superblock with one (the block map, the chunk
    /// index and the superblock check cover that much and no more).
    #[test]
    fn data_size_stops_where_the_hash_tree_starts() {
        let mut image = sample().image;
        image.size = 3 * 1024 * 1024;
        assert_eq!(image.data_size(), 3 * 1024 * 1024);
        image.verity = Some(verity_at(2 * 1024 * 1024));
        assert_eq!(image.data_size(), 2 * 1024 * 1024);
    }

    #[test]
    fn round_trip_is_byte_stable() {
        let m = sample();
        let bytes = m.to_bytes();
        let back = Manifest::parse(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), bytes);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"created\": \"2023-11-14T22:13:20Z\""), "{text}");
    }

    #[test]
    fn refuses_bad_fields() {
        type Edit = fn(&mut serde_json::Value);
        let cases: &[(&str, Edit)] = &[
            ("format", |v| v["format"] = 2.into()),
            ("unknown field", |v| v["rollin"] = 5.into()),
            ("rollout", |v| v["rollout"] = 101.into()),
            ("rollout", |v| v["rollout"] = (-1).into()),
            ("channel", |v| v["channel"] = "../etc".into()),
            ("channel", |v| v["channel"] = "Stable".into()),
            ("serial", |v| v["serial"] = 0.into()),
            ("serial", |v| v["serial"] = (-1).into()),
            ("version", |v| v["version"] = "a\nb".into()),
            ("expires", |v| v["expires"] = "2020-01-01T00:00:00Z".into()),
            ("expires", |v| v["expires"] = "tomorrow".into()),
            ("image.path", |v| v["image"]["path"] = "../../etc/shadow".into()),
            ("image.path", |v| v["image"]["path"] = "images/x.squashfs".into()),
            ("image.sha256", |v| v["image"]["sha256"] = "00".into()),
            ("image.format", |v| v["image"]["format"] = "erofs".into()),
            ("image.compression", |v| v["image"]["compression"] = "xz".into()),
            ("image.size", |v| v["image"]["size"] = 0.into()),
            ("index.path", |v| v["index"] = serde_json::json!({"path": "../x", "sha256": "0".repeat(64), "size": 5})),
            (
                "index.size",
                |v| v["index"] = serde_json::json!({"path": format!("indexes/{}.idx", "0".repeat(64)), "sha256": "0".repeat(64), "size": 0}),
            ),
            (
                "index field",
                |v| v["index"] = serde_json::json!({"path": format!("indexes/{}.idx", "0".repeat(64)), "sha256": "0".repeat(64), "size": 5, "x": 1}),
            ),
            ("missing", |v| {
                v.as_object_mut().unwrap().remove("expires");
            }),
        ];
        for (what, edit) in cases {
            let mut v = serde_json::to_value(sample()).unwrap();
            edit(&mut v);
            let bytes = serde_json::to_vec(&v).unwrap();
            assert!(Manifest::parse(&bytes).is_err(), "{what}: accepted {v}");
        }
        assert!(matches!(Manifest::parse(br#"{"format": 9}"#), Err(ManifestError::Format { found: 9 })));
        assert!(Manifest::parse(b"").is_err());
        assert!(Manifest::parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn channel_names() {
        for ok in ["stable", "beta-2", "a", "web.cgi_chroot"] {
            validate_channel(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "A", &"a".repeat(65), "a b"] {
            assert!(validate_channel(bad).is_err(), "{bad:?}");
        }
    }
}
