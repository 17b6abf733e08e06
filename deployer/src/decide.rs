//! What `apply` does with a verified manifest: a pure function of data, so
//! that the anti-replay, downgrade, rolled-back-serial and rollout rules are
//! tested by tables without root, a server or a mount.
//!
//! The floor is the highest serial this host has accepted per channel (from
//! any verified manifest it acted on: installed and switched to, re-signed
//! for the running image, or outside this host's rollout wave; a manifest
//! whose image was then refused does not raise it). It lives in the state file, not in a
//! slot, so neither a reused image nor a missing `link` can lower it: a
//! mirror replaying an older, correctly signed manifest is refused.

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::Manifest;
use serde::{Deserialize, Serialize};

use crate::state::SlotId;

/// The highest serial accepted on one channel, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    /// The serial.
    pub serial: u64,
    /// The image it signs (a serial names one image, forever).
    pub sha256: Sha256Digest,
    /// What raised it: `installed`, `re-signed` or `not-in-wave`.
    pub why: FloorReason,
}

/// What raised the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FloorReason {
    /// A manifest that was (or is being) installed.
    Installed,
    /// A new serial for the image already running (rollout change, promotion).
    ReSigned,
    /// A manifest whose staged rollout does not include this host yet.
    NotInWave,
}

/// What apply knows when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The fetched, verified manifest.
    pub fetched: &'a Manifest,
    /// The active slot and its manifest, if any.
    pub active: Option<(SlotId, &'a Manifest)>,
    /// The floor of the fetched manifest's channel.
    pub floor: Option<&'a Floor>,
    /// A serial the operator rolled back from.
    pub rolled_back_serial: Option<u64>,
    /// `allow_downgrade` from the config.
    pub allow_downgrade: bool,
    /// Whether this host is in the manifest's rollout wave (`None`: no staged rollout).
    pub in_wave: Option<bool>,
}

/// What apply does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Refuse the manifest.
    Refuse(Refusal),
    /// The image is already active; `resigned` when the manifest is a newer
    /// serial for it, whose manifest then replaces the active slot's.
    UpToDate {
        /// A newer serial of the running image.
        resigned: bool,
    },
    /// The operator rolled this serial back; stay.
    RolledBack,
    /// The staged rollout does not include this host yet.
    NotInWave,
    /// Install the image into the standby slot and switch.
    Install,
}

/// Why a correctly signed manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An older serial than this host has accepted.
    #[error("the server publishes serial {offered} but this host has already accepted serial {floor} ({why}); refusing to go back (a replayed old manifest?). Set allow_downgrade = true to permit it")]
    Replay {
        /// The fetched serial.
        offered: u64,
        /// The floor.
        floor: u64,
        /// How the floor was reached.
        why: &'static str,
    },
    /// One serial signed for two images.
    #[error("the server publishes serial {serial} with a different image than the one this host accepted for it; a serial must never be reused, republish with a new serial")]
    SerialReused {
        /// The serial.
        serial: u64,
    },
}

impl FloorReason {
    /// Words for messages.
    pub fn describe(self) -> &'static str {
        match self {
            FloorReason::Installed => "installed",
            FloorReason::ReSigned => "re-signed for the running image",
            FloorReason::NotInWave => "seen outside this host's rollout wave",
        }
    }
}

/// Decides what to do with `f.fetched`.
pub fn decide(f: Facts<'_>) -> Decision {
    let m = f.fetched;
    // The highest serial known here and the image it names: the recorded
    // floor, or the active slot's manifest for state files without one.
    let known = f
        .active
        .map(|(_, a)| (a.serial, a.image.sha256, FloorReason::Installed))
        .into_iter()
        .chain(f.floor.map(|fl| (fl.serial, fl.sha256, fl.why)))
        .max_by_key(|k| k.0);
    if let Some((serial, sha, why)) = known {
        if m.serial == serial && m.image.sha256 != sha {
            return Decision::Refuse(Refusal::SerialReused { serial });
        }
        if m.serial < serial && !f.allow_downgrade {
            return Decision::Refuse(Refusal::Replay { offered: m.serial, floor: serial, why: why.describe() });
        }
    }
    if let Some((_, a)) = f.active {
        if a.serial == m.serial && a.image.sha256 != m.image.sha256 {
            return Decision::Refuse(Refusal::SerialReused { serial: m.serial });
        }
        if a.image.sha256 == m.image.sha256 && a.serial <= m.serial {
            return Decision::UpToDate { resigned: a.serial < m.serial };
        }
        if f.rolled_back_serial == Some(m.serial) {
            return Decision::RolledBack;
        }
    }
    if f.in_wave == Some(false) {
        return Decision::NotInWave;
    }
    Decision::Install
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgdeploy_common::manifest::{image_path, ImageRef, Timestamp, FORMAT_VERSION};

    fn manifest(serial: u64, image: u8) -> Manifest {
        let sha256 = Sha256Digest([image; 32]);
        Manifest {
            format: FORMAT_VERSION,
            channel: "stable".into(),
            serial,
            version: format!("v{serial}"),
            created: Timestamp(1_700_000_000),
            expires: Timestamp(1_700_000_000 + 30 * 86400),
            image: ImageRef {
                path: image_path(&sha256),
                sha256,
                size: 4096,
                format: imgdeploy_common::manifest::ImageFormat::Squashfs,
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

    fn floor(serial: u64, image: u8, why: FloorReason) -> Floor {
        Floor { serial, sha256: Sha256Digest([image; 32]), why }
    }

    /// (fetched serial, image), active (serial, image), floor (serial, image), rolled back, allow_downgrade, in wave -> decision
    #[test]
    fn table() {
        use Decision::*;
        let replay = |offered, floor, why: FloorReason| Refuse(Refusal::Replay { offered, floor, why: why.describe() });
        type Row =
            ((u64, u8), Option<(u64, u8)>, Option<(u64, u8, FloorReason)>, Option<u64>, bool, Option<bool>, Decision);
        let rows: &[Row] = &[
            // First install.
            ((1, 1), None, None, None, false, None, Install),
            // A newer image.
            ((2, 2), Some((1, 1)), Some((1, 1, FloorReason::Installed)), None, false, None, Install),
            // The same serial again: up to date.
            (
                (2, 2),
                Some((2, 2)),
                Some((2, 2, FloorReason::Installed)),
                None,
                false,
                None,
                UpToDate { resigned: false },
            ),
            // The running image re-signed with a newer serial.
            (
                (3, 2),
                Some((2, 2)),
                Some((2, 2, FloorReason::Installed)),
                None,
                false,
                None,
                UpToDate { resigned: true },
            ),
            // Replay of an older serial, with and without allow_downgrade.
            (
                (1, 1),
                Some((2, 2)),
                Some((2, 2, FloorReason::Installed)),
                None,
                false,
                None,
                replay(1, 2, FloorReason::Installed),
            ),
            ((1, 1), Some((2, 2)), Some((2, 2, FloorReason::Installed)), None, true, None, Install),
            // Regression: X (1), Y (2), X again as 3 reused from the standby:
            // the floor is 3 even though the active slot's record once said 1.
            (
                (2, 2),
                Some((3, 1)),
                Some((3, 1, FloorReason::Installed)),
                None,
                false,
                None,
                replay(2, 3, FloorReason::Installed),
            ),
            // The floor holds without an active slot (link missing).
            (
                (2, 2),
                None,
                Some((3, 1, FloorReason::Installed)),
                None,
                false,
                None,
                replay(2, 3, FloorReason::Installed),
            ),
            // ...and after a serial seen outside the wave, or re-signed.
            (
                (2, 2),
                Some((2, 2)),
                Some((4, 4, FloorReason::NotInWave)),
                None,
                false,
                None,
                replay(2, 4, FloorReason::NotInWave),
            ),
            (
                (1, 1),
                Some((1, 1)),
                Some((2, 1, FloorReason::ReSigned)),
                None,
                false,
                None,
                replay(1, 2, FloorReason::ReSigned),
            ),
            // A state file from before the floor: the active slot is the floor.
            ((1, 1), Some((2, 2)), None, None, false, None, replay(1, 2, FloorReason::Installed)),
            // One serial, two images: refused against the floor and against the active slot.
            (
                (3, 9),
                Some((2, 2)),
                Some((3, 3, FloorReason::NotInWave)),
                None,
                false,
                None,
                Refuse(Refusal::SerialReused { serial: 3 }),
            ),
            ((2, 9), Some((2, 2)), None, None, false, None, Refuse(Refusal::SerialReused { serial: 2 })),
            ((2, 9), Some((2, 2)), None, None, true, None, Refuse(Refusal::SerialReused { serial: 2 })),
            // Rolled back from 3, now at 2: stay until a newer serial.
            ((3, 3), Some((2, 2)), Some((3, 3, FloorReason::Installed)), Some(3), false, None, RolledBack),
            ((4, 4), Some((2, 2)), Some((3, 3, FloorReason::Installed)), Some(3), false, None, Install),
            // Staged rollout.
            ((2, 2), Some((1, 1)), None, None, false, Some(false), NotInWave),
            ((2, 2), Some((1, 1)), None, None, false, Some(true), Install),
            // Already running the image: up to date whatever the wave says.
            ((3, 2), Some((2, 2)), None, None, false, Some(false), UpToDate { resigned: true }),
            // Downgrade permitted to an image the active slot holds under a higher serial.
            ((1, 2), Some((2, 2)), None, None, true, None, Install),
        ];
        for (i, (fetched, active, fl, rolled_back, allow, wave, want)) in rows.iter().enumerate() {
            let m = manifest(fetched.0, fetched.1);
            let a = active.map(|(s, img)| manifest(s, img));
            let fl = fl.map(|(s, img, why)| floor(s, img, why));
            let got = decide(Facts {
                fetched: &m,
                active: a.as_ref().map(|a| (SlotId::A, a)),
                floor: fl.as_ref(),
                rolled_back_serial: *rolled_back,
                allow_downgrade: *allow,
                in_wave: *wave,
            });
            assert_eq!(&got, want, "row {i}");
        }
    }

    #[test]
    fn refusals_name_what_to_do() {
        let r = Refusal::Replay { offered: 1, floor: 3, why: FloorReason::NotInWave.describe() };
        let s = r.to_string();
        assert!(s.contains("serial 1") && s.contains("serial 3") && s.contains("refusing to go back"), "{s}");
        assert!(s.contains("allow_downgrade = true") && s.contains("outside this host's rollout wave"), "{s}");
        assert!(Refusal::SerialReused { serial: 7 }.to_string().contains("republish with a new serial"));
    }
}
