//! Prometheus text-format metrics for node_exporter's textfile collector,
//! written atomically (temp file + rename) after every apply, so the
//! collector never reads half a file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use imgdeploy_common::atomic::write_atomic;
use imgdeploy_common::sign::PublicKey;

use crate::config::Config;
use crate::drain::{detached, Detached};
use crate::integrity::{of_mount_point, Integrity};
use crate::slot::installed;
use crate::state::{Layout, State};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// What the metrics say of the active slot.
#[derive(Debug, Clone)]
pub struct Active {
    /// Its serial.
    pub serial: u64,
    /// Its version label.
    pub version: String,
    /// How its reads are checked (`None`: not mounted).
    pub integrity: Option<Integrity>,
    /// dm-verity found a corrupted block in it.
    pub corrupted: bool,
}

/// Renders the metrics text.
pub fn render(cfg: &Config, state: &State, active: Option<Active>, detached: &[Detached]) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {value}");
    };
    let ch = format!("{{channel=\"{}\"}}", escape(&cfg.channel));
    match &active {
        Some(a) => {
            gauge(
                "imgdeploy_active_serial",
                "Serial of the image the active link points at.",
                &ch,
                a.serial.to_string(),
            );
            gauge(
                "imgdeploy_active_info",
                "The active image's version label (value is always 1).",
                &format!("{{channel=\"{}\",version=\"{}\"}}", escape(&cfg.channel), escape(&a.version)),
                "1".into(),
            );
            if let Some(i) = a.integrity {
                gauge(
                    "imgdeploy_active_integrity",
                    "How reads of the active slot are checked: verity (every block) or install-time (value is always 1).",
                    &format!("{{channel=\"{}\",integrity=\"{}\"}}", escape(&cfg.channel), i.as_str()),
                    "1".into(),
                );
            }
            gauge(
                "imgdeploy_active_corrupted",
                "1 if dm-verity found a corrupted block in the active slot (reads of it fail; apply repairs it).",
                &ch,
                u8::from(a.corrupted).to_string(),
            );
        }
        None => gauge("imgdeploy_active_serial", "Serial of the image the active link points at.", &ch, "0".into()),
    }
    gauge(
        "imgdeploy_detached_versions",
        "Old versions detached while processes were still inside them (gone when those exit).",
        &ch,
        detached.len().to_string(),
    );
    gauge(
        "imgdeploy_detached_users",
        "Processes still using a detached old version.",
        &ch,
        detached.iter().map(|d| d.users.len()).sum::<usize>().to_string(),
    );
    if let Some(b) = &state.last_boot {
        gauge(
            "imgdeploy_last_boot_fallback",
            "1 if the last boot-time mount could not serve the active slot and fell back (or failed).",
            &ch,
            u8::from(b.fallback_from.is_some() || b.serial.is_none()).to_string(),
        );
    }
    if let Some(a) = &state.last_apply {
        let ok = if a.result == crate::state::ApplyResult::Failed { 0 } else { 1 };
        gauge(
            "imgdeploy_last_apply_success",
            "1 if the last apply succeeded (switched, up to date, not in the wave).",
            &ch,
            ok.to_string(),
        );
        gauge(
            "imgdeploy_last_apply_result",
            "The last apply's result (value is always 1).",
            &format!("{{channel=\"{}\",result=\"{}\"}}", escape(&cfg.channel), escape(&a.result.to_string())),
            "1".into(),
        );
        gauge(
            "imgdeploy_last_apply_timestamp_seconds",
            "When the last apply finished, in seconds since the epoch.",
            &ch,
            a.time.0.to_string(),
        );
        gauge(
            "imgdeploy_last_apply_duration_seconds",
            "How long the last apply took.",
            &ch,
            format!("{:.3}", a.duration_ms as f64 / 1000.0),
        );
        gauge(
            "imgdeploy_last_apply_downloaded_bytes",
            "Image bytes the last apply fetched from the server.",
            &ch,
            a.bytes_downloaded.to_string(),
        );
        gauge(
            "imgdeploy_last_apply_reused_bytes",
            "Image bytes the last apply reused from images on this host.",
            &ch,
            a.bytes_reused.to_string(),
        );
    }
    out
}

/// Writes the metrics file for the current state.
pub fn write(cfg: &Config, layout: &Layout, state: &State, path: &Path) -> Result<()> {
    let keys: Vec<PublicKey> = cfg.trusted_keys()?;
    let active = match crate::switch::active_slot(cfg, layout)? {
        Some(slot) => installed(layout, slot, &keys)?.map(|i| {
            let found = of_mount_point(&layout.mount_point(slot));
            let (integrity, corrupted) = (found.map(|(i, _)| i), found.is_some_and(|(_, c)| c));
            Active { serial: i.manifest.serial, version: i.manifest.version, integrity, corrupted }
        }),
        None => None,
    };
    write_atomic(path, render(cfg, state, active, &detached(layout)).as_bytes(), 0o644)?;
    Ok(())
}
