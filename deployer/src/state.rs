//! The state directory: two slots, their mount points, and a small state file.
//!
//! ```text
//! STATE_DIR/
//!   lock                      flock: one imgdeploy at a time
//!   state.json                last apply result, active slot, rolled-back serial
//!   slots/{a,b}/image.squashfs  a verified image (only after its sha256 matched)
//!   slots/{a,b}/index.idx       its chunk index (seed for later delta updates)
//!   slots/{a,b}/manifest.json   its signed manifest (+ .sig), written last
//!   slots/{a,b}/image.partial   a download in progress (+ partial.json: which image)
//!   mnt/{a,b}                 mount points; `link` points at one of them
//! ```
//!
//! Who may read what: `state_dir`, `mnt/` and the mount points are 0755, so
//! an unprivileged web server (`www-data`) can reach the served tree through
//! `link`; `slots/` (images, manifests, partial downloads) and the state file
//! are root's alone (0700 and 0600). The mounted image's own modes decide
//! the rest.
//!
//! The truth about which slot is active is `link` itself: the state file only
//! remembers it for boot (when the link may live on a tmpfs) and records
//! history. A slot is installed exactly when its manifest file exists, and
//! the manifest is written after the image it describes was verified.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use imgdeploy_common::atomic::{create_dir_all_durable, write_atomic};
use imgdeploy_common::manifest::Timestamp;
use serde::{Deserialize, Serialize};

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum SlotId {
    /// Slot a.
    A,
    /// Slot b.
    B,
}

impl SlotId {
    /// Both slots.
    pub const ALL: [SlotId; 2] = [SlotId::A, SlotId::B];

    /// The other slot.
    pub fn other(self) -> SlotId {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }

    /// "a" or "b".
    pub fn name(self) -> &'static str {
        match self {
            SlotId::A => "a",
            SlotId::B => "b",
        }
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Directories every user may traverse: the way from `link` to the served tree.
const READABLE: u32 = 0o755;
/// Directories only root may enter: images, manifests, partial downloads.
const PRIVATE: u32 = 0o700;

fn set_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::symlink_metadata(dir)?;
    if md.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Paths inside the state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The (canonical) state directory.
    pub root: PathBuf,
}

impl Layout {
    /// Creates the directory tree and canonicalises `root`. Modes are set
    /// every time, not only on creation, so a state directory made by an
    /// older release (all 0700, unreadable for a web server) is repaired.
    pub fn create(root: &Path) -> io::Result<Self> {
        // Checked before and after creation: a symlink or a directory other
        // users can write must never hold images the kernel mounts.
        crate::safety::check_dir(root, "state_dir").map_err(io::Error::other)?;
        create_dir_all_durable(root, READABLE)?;
        crate::safety::check_dir(root, "state_dir").map_err(io::Error::other)?;
        let root = std::fs::canonicalize(root)?;
        crate::safety::check_trusted_ancestors(&root, "state_dir").map_err(io::Error::other)?;
        let layout = Layout { root };
        set_mode(&layout.root, READABLE)?;
        for (dir, mode) in [("slots", PRIVATE), ("mnt", READABLE)] {
            create_dir_all_durable(&layout.root.join(dir), mode)?;
            set_mode(&layout.root.join(dir), mode)?;
        }
        for s in SlotId::ALL {
            for (dir, mode) in [(layout.slot_dir(s), PRIVATE), (layout.mount_point(s), READABLE)] {
                create_dir_all_durable(&dir, mode)?;
                // A mounted slot shows the image's root directory here; its
                // mode is the image's business, not ours.
                if crate::mount::mounted_at(&dir).map_err(io::Error::other)?.is_none() {
                    set_mode(&dir, mode)?;
                }
            }
        }
        Ok(layout)
    }

    /// A slot's directory.
    pub fn slot_dir(&self, s: SlotId) -> PathBuf {
        self.root.join("slots").join(s.name())
    }
    /// A slot's verified image.
    pub fn image(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("image.squashfs")
    }
    /// A slot's manifest.
    pub fn manifest(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("manifest.json")
    }
    /// A slot's manifest signature.
    pub fn signature(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("manifest.json.sig")
    }
    /// A slot's chunk index (as published, compressed), for later deltas.
    pub fn index(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("index.idx")
    }
    /// A slot's download in progress.
    pub fn partial(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("image.partial")
    }
    /// A static delta being applied into the slot's partial file.
    pub fn static_delta(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("image.delta")
    }
    /// Which image the partial download is of.
    pub fn partial_meta(&self, s: SlotId) -> PathBuf {
        self.slot_dir(s).join("partial.json")
    }
    /// A slot's mount point.
    pub fn mount_point(&self, s: SlotId) -> PathBuf {
        self.root.join("mnt").join(s.name())
    }
    /// The state file.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }
    /// Which slot's mount point `target` is, if any.
    pub fn slot_of_target(&self, target: &Path) -> Option<SlotId> {
        SlotId::ALL.into_iter().find(|s| self.mount_point(*s) == target)
    }
}

/// How an `apply` ended (kebab-case in JSON and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyResult {
    /// It switched to a new version.
    Switched,
    /// Nothing to do.
    UpToDate,
    /// The manifest's rollout wave does not include this host.
    NotInWave,
    /// A dry run (never recorded; listed for completeness).
    DryRun,
    /// It failed; the message says why.
    Failed,
}

impl std::fmt::Display for ApplyResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyResult::Switched => "switched",
            ApplyResult::UpToDate => "up-to-date",
            ApplyResult::NotInWave => "not-in-wave",
            ApplyResult::DryRun => "dry-run",
            ApplyResult::Failed => "failed",
        })
    }
}

/// What the last `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRecord {
    /// When it finished.
    pub time: Timestamp,
    /// How it ended.
    pub result: ApplyResult,
    /// The serial it was about (if a manifest was verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// One line for humans.
    pub message: String,
    /// How long it took.
    pub duration_ms: u64,
    /// Bytes fetched from the server.
    #[serde(default)]
    pub bytes_downloaded: u64,
    /// Bytes reused from images already on this host (delta updates).
    #[serde(default)]
    pub bytes_reused: u64,
}

/// What the last `imgdeploy mount` (at boot) did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// When.
    pub time: Timestamp,
    /// The slot `link` was pointed at.
    pub slot: SlotId,
    /// Its serial, if one could be served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// The active slot that failed verification, when the other one was used instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<SlotId>,
    /// One line for humans: what happened and why.
    pub message: String,
}

/// The state file (format 1). Fields added later must have defaults, so old files keep parsing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Always 1.
    #[serde(default = "one")]
    pub format: u32,
    /// The slot `link` was last pointed at.
    #[serde(default)]
    pub active: Option<SlotId>,
    /// A serial the operator rolled back from; apply skips it until a newer one is published.
    #[serde(default)]
    pub rolled_back_serial: Option<u64>,
    /// The last apply.
    #[serde(default)]
    pub last_apply: Option<ApplyRecord>,
    /// The last boot-time mount.
    #[serde(default)]
    pub last_boot: Option<BootRecord>,
    /// Per channel, the highest serial accepted here: older manifests are
    /// refused as replays (see [`crate::decide`]).
    #[serde(default)]
    pub floor: std::collections::BTreeMap<String, crate::decide::Floor>,
}

fn one() -> u32 {
    1
}

/// Why the state file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not valid JSON of our shape.
    #[error("state file {path} is corrupt ({why}); the slots and `link` are intact: remove the file and rerun to rebuild it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Parser message.
        why: String,
    },
    /// I/O error.
    #[error("cannot access state file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl State {
    /// Raises `channel`'s floor to the manifest `m` (never lowers it: a
    /// permitted downgrade keeps the highest serial seen).
    pub fn raise_floor(&mut self, m: &imgdeploy_common::manifest::Manifest, why: crate::decide::FloorReason) {
        let new = crate::decide::Floor { serial: m.serial, sha256: m.image.sha256, why };
        match self.floor.get(&m.channel) {
            Some(f) if f.serial >= m.serial => {}
            _ => {
                self.floor.insert(m.channel.clone(), new);
            }
        }
    }

    /// Parses state JSON.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let s: State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if s.format != 1 {
            return Err(format!("format {} is not supported", s.format));
        }
        Ok(s)
    }

    /// Loads the state file (default state when absent).
    pub fn load(layout: &Layout) -> Result<Self, StateError> {
        let path = layout.state_file();
        match std::fs::read(&path) {
            Ok(b) => State::parse(&b).map_err(|why| StateError::Corrupt { path, why }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State { format: 1, ..Default::default() }),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes the state file atomically.
    pub fn save(&self, layout: &Layout) -> Result<(), StateError> {
        let path = layout.state_file();
        let mut bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        bytes.push(b'\n');
        write_atomic(&path, &bytes, 0o600).map_err(|source| StateError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// State files written by earlier versions must keep parsing.
    #[test]
    fn old_state_files_still_parse() {
        let fixtures: &[&str] = &[
            r#"{"format":1}"#,
            r#"{"format":1,"active":"b","last_apply":{"time":"2026-11-25T07:00:00Z","result":"switched","serial":3,"message":"m","duration_ms":5}}"#,
            r#"{"format":1,"active":"a","rolled_back_serial":4,"last_apply":null}"#,
            r#"{"format":1,"active":"a","floor":{"stable":{"serial":3,"sha256":"0000000000000000000000000000000000000000000000000000000000000000","why":"not-in-wave"}}}"#,
            r#"{"format":1,"active":"a","last_boot":{"time":"2026-11-25T07:00:00Z","slot":"a","serial":1,"fallback_from":"b","message":"m"}}"#,
        ];
        for f in fixtures {
            State::parse(f.as_bytes()).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        assert!(State::parse(b"{").is_err());
        assert!(State::parse(br#"{"format":2}"#).is_err());
        assert!(State::parse(br#"{"format":1,"active":"c"}"#).is_err());
    }

    #[test]
    fn save_load_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let l = Layout::create(&d.path().join("state")).unwrap();
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
        };
        // Readers reach the mount points; only root reaches the images.
        assert_eq!(mode(&l.root), 0o755);
        assert_eq!(mode(&l.mount_point(SlotId::A)), 0o755);
        assert_eq!(mode(&l.root.join("mnt")), 0o755);
        assert_eq!(mode(&l.root.join("slots")), 0o700);
        assert_eq!(mode(&l.slot_dir(SlotId::B)), 0o700);
        // A state dir made by an older release (0700 everywhere) is repaired.
        std::fs::set_permissions(&l.root, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(l.mount_point(SlotId::B), std::fs::Permissions::from_mode(0o700)).unwrap();
        let l = Layout::create(&l.root).unwrap();
        assert_eq!((mode(&l.root), mode(&l.mount_point(SlotId::B))), (0o755, 0o755));
        let s = State { format: 1, active: Some(SlotId::B), ..Default::default() };
        s.save(&l).unwrap();
        assert_eq!(State::load(&l).unwrap(), s);
        assert_eq!(l.slot_of_target(&l.mount_point(SlotId::A)), Some(SlotId::A));
    }
}
