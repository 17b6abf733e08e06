//! The `imgdeploy` command line. stdout carries data (`--json` where a
//! script would parse it); logs and progress go to stderr.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::apply::{apply, ApplyOptions, Outcome};
use crate::config::{Config, DEFAULT_CONFIG};
use crate::drain::describe;

/// Keep a read-only tree identical on every server: fetch a signed image into
/// the standby slot, verify it, mount it read-only and switch atomically.
#[derive(Debug, Parser)]
#[command(name = "imgdeploy", version, about)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Config file.
    #[arg(long, short = 'c', global = true, env = "IMGDEPLOY_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, verify, mount and switch to the published image (idempotent).
    Apply {
        /// Use this manifest URL or path instead of the configured `source`.
        #[arg(long)]
        source: Option<String>,
        /// Only report what an update would download (bytes, requests); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash the active image and, if it is damaged (or dm-verity has
    /// failed a read of it), rebuild it in the other slot from the good
    /// local chunks plus the damaged ones from the origin, then switch to it.
    /// Otherwise the same as `apply` (a newer published serial is installed).
    Repair {
        /// Use this manifest URL or path instead of the configured `source`.
        #[arg(long)]
        source: Option<String>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show both slots, which is active, where `link` points, the last apply.
    Status {
        /// Print the status as JSON (stable schema, see README).
        #[arg(long)]
        json: bool,
    },
    /// Re-hash both slot images against their signed manifests.
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Switch back to the standby slot's image.
    Rollback,
    /// At boot: mount the active slot and restore `link` (idempotent).
    Mount,
    /// Wait for processes to leave the standby slot's mount, then unmount it
    /// (or detach it, as `on_drain_timeout` says, when they stay).
    Drain {
        /// How long to wait (default: drain_timeout from the config).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Netboot: run as PID 1 of an `imgbuild netboot` initramfs (also chosen
    /// when the binary is started as `/init`). Never run it on a live system.
    #[command(hide = true)]
    Boot,
}

/// Whether this process was started as a netboot initramfs's `/init`: boot
/// mode is chosen by the name the kernel runs us under, never by being PID 1
/// alone (a container's entrypoint or `unshare -pf` is PID 1 too).
pub fn started_as_init(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0 == Some(std::ffi::OsStr::new("/init"))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_retired(r: &crate::drain::Retired) {
    if !r.still_in_use.is_empty() {
        let what = if r.detached { "old version detached" } else { "old slot still mounted" };
        println!("{what}, in use by {}", describe(&r.still_in_use));
    }
}

/// Prints what an apply (or repair) did.
fn print_outcome(outcome: &Outcome, json: bool) -> Result<()> {
    if json {
        return print_json(outcome);
    }
    match outcome {
        Outcome::UpToDate { message, .. } => println!("up to date: {message}"),
        Outcome::NotInWave { message, .. } => println!("not in the wave: {message}"),
        Outcome::WouldUpdate {
            serial,
            mode,
            download_bytes,
            requests,
            reused_bytes,
            computed_bytes,
            image_size,
            index_bytes,
        } => println!(
            "would update to serial {serial} ({mode}): download {download_bytes} of {image_size} image bytes in {requests} requests, reuse {reused_bytes} local bytes, compute {computed_bytes} bytes of hash tree, plus a {index_bytes}-byte chunk index"
        ),
        Outcome::Switched { serial, version, slot, download, retired, .. } => {
            println!(
                "switched to serial {serial} ({version}) in slot {slot}; {}: {} bytes fetched, {} reused",
                download.mode, download.downloaded, download.reused
            );
            print_retired(retired);
        }
    }
    Ok(())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if matches!(cli.command, Command::Boot) {
        crate::boot::boot_main();
    }
    let cfg = Config::load(&cli.global.config)?;
    match cli.command {
        Command::Apply { source, dry_run, json } => {
            print_outcome(&apply(&cfg, &ApplyOptions { source, dry_run, check_active: false })?, json)?
        }
        Command::Repair { source, json } => {
            print_outcome(&apply(&cfg, &ApplyOptions { source, dry_run: false, check_active: true })?, json)?
        }
        Command::Status { json } => {
            let s = crate::ops::status(&cfg)?;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "link     {} -> {}",
                    s.link.display(),
                    s.link_target.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(missing)".into())
                );
                for (role, slot) in [("active", &s.active), ("standby", &s.standby)] {
                    match slot {
                        Some(x) if x.installed => println!(
                            "{role:<8} slot {}: serial {} ({}), sha256 {}, {}{}",
                            x.slot,
                            x.serial.unwrap_or(0),
                            x.version.as_deref().unwrap_or("?"),
                            x.sha256.map(|d| d.to_string()[..16].to_owned()).unwrap_or_default(),
                            x.mounted
                                .as_ref()
                                .map(|m| format!(
                                    "mounted at {} ({}{})",
                                    m.display(),
                                    x.integrity.unwrap_or(crate::integrity::Integrity::InstallTime).describe(),
                                    if x.corrupted { ", CORRUPTED blocks found: run imgdeploy apply" } else { "" }
                                ))
                                .unwrap_or_else(|| "not mounted".into()),
                            if x.users.is_empty() {
                                String::new()
                            } else {
                                format!(", in use by {}", describe(&x.users))
                            }
                        ),
                        Some(x) => println!(
                            "{role:<8} slot {}: empty{}",
                            x.slot,
                            x.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                        ),
                        None => println!("{role:<8} none"),
                    }
                }
                if let Some(p) = &s.pending {
                    println!("pending  slot {}: {} bytes downloaded", p.slot, p.bytes);
                }
                for d in &s.detached {
                    println!(
                        "detached {} (slot {}, serial {}): in use by {}",
                        d.device,
                        d.slot.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                        d.serial.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                        describe(&d.users)
                    );
                }
                for (channel, f) in &s.floor {
                    println!("floor    {channel}: serial {} ({})", f.serial, f.why.describe());
                }
                if let Some(a) = &s.last_apply {
                    println!("last     {} at {}: {}", a.result, a.time, a.message);
                }
                if let Some(b) = s.last_boot.as_ref().filter(|b| b.fallback_from.is_some() || b.serial.is_none()) {
                    println!("boot     at {}: {}", b.time, b.message);
                }
                for e in &s.errors {
                    println!("problem  {e}");
                }
            }
        }
        Command::Verify { json } => {
            let checks = crate::ops::verify(&cfg)?;
            if json {
                print_json(&checks)?;
            } else {
                for c in &checks {
                    println!("slot {}: {}: {}", c.slot, c.result, c.message);
                }
            }
            let bad: Vec<String> =
                checks.iter().filter(|c| c.result == crate::ops::SlotHealth::Bad).map(|c| c.slot.to_string()).collect();
            if !bad.is_empty() {
                bail!("slot {} failed verification; run `imgdeploy repair` to rebuild the active slot from its good chunks and the origin (a damaged standby is rewritten by the next update)", bad.join(" and "));
            }
        }
        Command::Rollback => {
            let (slot, serial, retired) = crate::ops::rollback(&cfg)?;
            println!("rolled back to serial {serial} in slot {slot}");
            print_retired(&retired);
        }
        Command::Mount => match crate::ops::mount_active(&cfg)? {
            crate::ops::BootMount::Mounted { slot, serial } => {
                println!("slot {slot} (serial {serial}) mounted, {} restored", cfg.link.display())
            }
            crate::ops::BootMount::NothingDeployed => println!("nothing deployed yet"),
        },
        Command::Drain { timeout } => {
            let r = crate::ops::drain(&cfg, timeout.unwrap_or(cfg.drain_timeout))?;
            match (r.still_in_use.is_empty(), r.detached) {
                (true, _) => println!("standby slot unmounted"),
                (false, true) => println!("standby slot detached; still in use by {}", describe(&r.still_in_use)),
                (false, false) => {
                    bail!("standby slot is still in use by {}; it stays mounted", describe(&r.still_in_use))
                }
            }
        }
        Command::Boot => unreachable!("handled before the config is read"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let c = Cli::try_parse_from(["imgdeploy", "-c", "/x.toml", "apply", "--source", "http://h/s.json", "--json"])
            .unwrap();
        assert_eq!(c.global.config, PathBuf::from("/x.toml"));
        assert!(matches!(c.command, Command::Apply { source: Some(_), json: true, dry_run: false }));
        let c = Cli::try_parse_from(["imgdeploy", "drain", "--timeout", "90s"]).unwrap();
        assert!(matches!(c.command, Command::Drain { timeout: Some(d) } if d == Duration::from_secs(90)));
        assert!(Cli::try_parse_from(["imgdeploy", "drain", "--timeout", "forever"]).is_err());
        assert!(Cli::try_parse_from(["imgdeploy", "frobnicate"]).is_err());
        assert!(matches!(Cli::try_parse_from(["imgdeploy", "boot"]).unwrap().command, Command::Boot));
    }

    #[test]
    fn boot_mode_only_as_init() {
        use std::ffi::OsStr;
        assert!(started_as_init(Some(OsStr::new("/init"))));
        for other in ["imgdeploy", "/usr/bin/imgdeploy", "init", "/sbin/init", ""] {
            assert!(!started_as_init(Some(OsStr::new(other))), "{other}");
        }
        assert!(!started_as_init(None));
    }
}
