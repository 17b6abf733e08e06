//! `imgdeploy verify`: re-hash both slots against their signed manifests.

use anyhow::Result;
use imgdeploy_common::report::one_line;
use serde::Serialize;

use crate::config::Config;
use crate::slot::{installed, open_verified};
use crate::state::{Layout, SlotId};

/// What `verify` found in a slot (`ok`, `empty`, `bad` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotHealth {
    /// Its image matches its signed manifest.
    Ok,
    /// Nothing installed.
    Empty,
    /// The manifest or the image does not check out.
    Bad,
}

impl std::fmt::Display for SlotHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotHealth::Ok => "ok",
            SlotHealth::Empty => "empty",
            SlotHealth::Bad => "bad",
        })
    }
}

/// Result of `verify` for one slot.
#[derive(Debug, Serialize)]
pub struct SlotCheck {
    /// The slot.
    pub slot: SlotId,
    /// What was found.
    pub result: SlotHealth,
    /// Serial, if installed.
    pub serial: Option<u64>,
    /// Details.
    pub message: String,
}

/// Re-hashes both slots against their signed manifests.
pub fn verify(cfg: &Config) -> Result<Vec<SlotCheck>> {
    let layout = Layout::create(&cfg.state_dir)?;
    let keys = cfg.trusted_keys()?;
    Ok(SlotId::ALL
        .into_iter()
        .map(|slot| match installed(&layout, slot, &keys) {
            Ok(None) => {
                SlotCheck { slot, result: SlotHealth::Empty, serial: None, message: "no image installed".into() }
            }
            Ok(Some(i)) => match open_verified(&layout, slot, &i.manifest) {
                Ok(_) => SlotCheck {
                    slot,
                    result: SlotHealth::Ok,
                    serial: Some(i.manifest.serial),
                    message: format!(
                        "serial {} ({}), sha256 {} verified",
                        i.manifest.serial, i.manifest.version, i.manifest.image.sha256
                    ),
                },
                Err(e) => {
                    SlotCheck { slot, result: SlotHealth::Bad, serial: Some(i.manifest.serial), message: one_line(&e) }
                }
            },
            Err(e) => SlotCheck { slot, result: SlotHealth::Bad, serial: None, message: one_line(&e) },
        })
        .collect())
}
