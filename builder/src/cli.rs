//! The `imgbuild` command line. stdout carries data (`--json` for scripts),
//! stderr carries logs and progress.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::transport::PrivateOrigin;

use crate::publish::Repo;
use crate::publish_tree::{build, short, BuildRequest};

/// Pack a master tree into a signed, reproducible squashfs image and publish
/// it into a repository directory served by any static HTTP server.
#[derive(Debug, Parser)]
#[command(name = "imgbuild", version, about)]
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
    /// Create an Ed25519 key pair: PREFIX.key (PKCS#8 PEM, 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Pack SRC into an image and publish it to a channel in the repository.
    Build(BuildArgs),
    /// Check a published manifest: signature, expiry, image size and sha256.
    Verify {
        /// Manifest path or http(s) URL (its signature is MANIFEST.sig).
        manifest: String,
        /// Trusted public key (repeat for several).
        #[arg(long = "pub", value_name = "PREFIX.pub", required = true)]
        public: Vec<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        origin: OriginArgs,
    },
    /// Show what a manifest or an image file says (does not check signatures).
    Inspect {
        /// A manifest (.json) or an image (.squashfs).
        path: PathBuf,
        /// Also summarise the image's block map (needs a manifest, beside its map).
        #[arg(long)]
        blocks: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build PXE/iPXE artifacts that boot a machine from the image in RAM.
    Netboot {
        /// The channel manifest (path or http(s) URL); verified before use. Its channel and serial are bound
        /// into the initrd. Default with --channel-url: the first channel URL.
        #[arg(long, required_unless_present = "channel_url")]
        manifest: Option<String>,
        /// Network mode: /init fetches the channel's current manifest and image from this URL at boot (repeat
        /// for mirrors, tried in order; imgdeploy.url= on the kernel command line replaces them). No image.cpio
        /// is written.
        #[arg(long = "channel-url", value_name = "URL")]
        channel_url: Vec<String>,
        /// Network mode: a statically linked busybox for udhcpc and ip (default /bin/busybox, from busybox-static).
        #[arg(long, requires = "channel_url")]
        busybox: Option<PathBuf>,
        /// Network mode: more network driver modules to include, beyond virtio_net, e1000, e1000e, igb, ixgbe
        /// and mlx5_core (repeatable or comma-separated).
        #[arg(long = "net-modules", value_name = "NAME", value_delimiter = ',', requires = "channel_url")]
        net_modules: Vec<String>,
        /// Trusted public key, checked now and embedded for boot-time checks (repeatable).
        #[arg(long = "pub", value_name = "PREFIX.pub", required = true)]
        public: Vec<PathBuf>,
        /// Kernel image to boot (e.g. /boot/vmlinuz-6.1.0-28-amd64).
        #[arg(long)]
        kernel: PathBuf,
        /// That kernel's module directory (e.g. /lib/modules/6.1.0-28-amd64).
        #[arg(long)]
        modules: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// A statically linked imgdeploy to run as /init (default: /usr/lib/imgdeploy/netboot-init from the
        /// imgbuild package; scripts/build-netboot-init.sh builds one).
        #[arg(long)]
        init: Option<PathBuf>,
        /// A static shell to include as /bin/sh for imgdeploy.onfail=shell (e.g. /bin/busybox).
        #[arg(long)]
        shell: Option<PathBuf>,
        /// Extra kernel command line written into boot.ipxe.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        origin: OriginArgs,
    },
    /// Re-sign a channel's manifest with a staged-rollout percentage (same image, new serial; 0 pauses).
    Rollout {
        /// Repository directory.
        #[arg(long, env = "IMGBUILD_REPO")]
        repo: PathBuf,
        /// The channel.
        #[arg(long)]
        channel: String,
        /// Share of hosts that should take the image (0-100).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
        /// Private signing key.
        #[arg(long, env = "IMGBUILD_KEY", value_name = "PREFIX.key")]
        key: PathBuf,
        /// Also accept the repository's current manifests when signed by
        /// this public key: the first publish after a key rotation (repeatable).
        #[arg(long, value_name = "OLD.pub")]
        trust: Vec<PathBuf>,
        /// How long the new manifest stays valid.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
        /// Print the new manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-sign a channel's current manifest with a new expiry (same image, same rollout, next serial); run it from a CI schedule.
    Refresh {
        /// Repository directory.
        #[arg(long, env = "IMGBUILD_REPO")]
        repo: PathBuf,
        /// The channel.
        #[arg(long)]
        channel: String,
        /// Private signing key.
        #[arg(long, env = "IMGBUILD_KEY", value_name = "PREFIX.key")]
        key: PathBuf,
        /// Also accept the repository's current manifests when signed by
        /// this public key: the first publish after a key rotation (repeatable).
        #[arg(long, value_name = "OLD.pub")]
        trust: Vec<PathBuf>,
        /// How long the new manifest stays valid.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
        /// Print the new manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sign a manifest for channel TO serving exactly the image channel FROM serves.
    Promote {
        /// Repository directory.
        #[arg(long, env = "IMGBUILD_REPO")]
        repo: PathBuf,
        /// Source channel (e.g. beta).
        #[arg(long)]
        from: String,
        /// Target channel (e.g. stable).
        #[arg(long)]
        to: String,
        /// Start the target channel as a staged rollout (0-100).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: Option<u8>,
        /// Private signing key.
        #[arg(long, env = "IMGBUILD_KEY", value_name = "PREFIX.key")]
        key: PathBuf,
        /// Also accept the repository's current manifests when signed by
        /// this public key: the first publish after a key rotation (repeatable).
        #[arg(long, value_name = "OLD.pub")]
        trust: Vec<PathBuf>,
        /// How long the new manifest stays valid.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
        /// Print the new manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove images, chunk indexes and sigs/ signatures no channel references, keeping the newest N of each.
    Gc {
        /// Repository directory.
        #[arg(long, env = "IMGBUILD_REPO")]
        repo: PathBuf,
        /// Unreferenced images to keep (newest first).
        #[arg(long, default_value_t = 2)]
        keep: usize,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What a private origin needs (for a manifest given as an https:// URL).
#[derive(Debug, Clone, Args)]
pub struct OriginArgs {
    /// File of `Name: value` HTTP headers sent with every request (e.g. a bearer token); mode 0600.
    #[arg(long, value_name = "FILE", env = "IMGBUILD_HTTP_HEADERS_FILE")]
    pub http_headers_file: Option<PathBuf>,
    /// PEM CA certificates that replace the built-in roots for the origin.
    #[arg(long, value_name = "FILE", env = "IMGBUILD_TLS_CA_BUNDLE")]
    pub tls_ca_bundle: Option<PathBuf>,
    /// PEM client certificate chain presented to the origin (with --tls-client-key).
    #[arg(long, value_name = "FILE", env = "IMGBUILD_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert; mode 0600.
    #[arg(long, value_name = "FILE", env = "IMGBUILD_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl OriginArgs {
    fn private_origin(self) -> PrivateOrigin {
        PrivateOrigin {
            headers_file: self.http_headers_file,
            ca_bundle: self.tls_ca_bundle,
            client_cert: self.tls_client_cert,
            client_key: self.tls_client_key,
        }
    }
}

/// Arguments of `build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The root of the tree to pack.
    pub src: PathBuf,
    /// Private signing key (PKCS#8 PEM).
    #[arg(long, env = "IMGBUILD_KEY", value_name = "PREFIX.key")]
    pub key: PathBuf,
    /// Also accept the repository's current manifest when signed by this
    /// public key: the first publish after a key rotation (repeatable).
    #[arg(long, value_name = "OLD.pub")]
    pub trust: Vec<PathBuf>,
    /// Channel to publish to (a-z, 0-9, '.', '_', '-').
    #[arg(long)]
    pub channel: String,
    /// Repository directory (created if missing).
    #[arg(long, env = "IMGBUILD_REPO")]
    pub repo: PathBuf,
    /// Human version label (default: r<serial>).
    #[arg(long = "version", value_name = "LABEL")]
    pub version_label: Option<String>,
    /// Serial number (default: the channel's current serial + 1; must increase).
    #[arg(long)]
    pub serial: Option<u64>,
    /// zstd compression level.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=22))]
    pub level: u32,
    /// Leave out paths matching this glob, relative to SRC (repeatable; `*` stays within a component, `**` crosses).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// How long the manifest stays valid (e.g. 7d, 12h). Shorter limits how
    /// long a mirror can hold hosts on an old manifest; `imgbuild refresh`
    /// on a CI schedule keeps it from running out.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub expires_in: Duration,
    /// Compression threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub jobs: u32,
    /// Store each file's tail in its own block instead of shared fragment blocks.
    #[arg(long)]
    pub no_fragments: bool,
    /// Start each file's data at a 4 KiB boundary of the image, so that
    /// deployers whose state directory is on XFS or btrfs share the extents
    /// of unchanged files with the old image instead of copying them (the
    /// image grows by about 2 KiB per file of 128 KiB or more).
    #[arg(long)]
    pub align: bool,
    /// Compress every block, instead of copying the compressed bytes of
    /// blocks the repository's current images already hold (the image is
    /// the same either way).
    #[arg(long)]
    pub no_reuse: bool,
    /// Make static deltas to the new image from the channel's last K
    /// images (0: none). Deployers older than static deltas refuse a
    /// manifest that lists any: build with 0 until the fleet is upgraded.
    #[arg(long, value_name = "K", default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=16))]
    pub deltas: u64,
    /// Publish as a staged rollout to this share of hosts (0-100; default: all).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rollout: Option<u8>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths.iter().map(|p| PublicKey::read(p).map_err(Into::into)).collect()
}

fn report_resigned(r: &crate::channel::Resigned, json: bool) -> Result<()> {
    if json {
        return print_json(&r.manifest);
    }
    let m = &r.manifest;
    println!(
        "{} serial {} now serves {} ({}) to {} of hosts",
        m.channel,
        m.serial,
        m.version,
        m.image.sha256,
        m.rollout.map(|p| format!("{p}%")).unwrap_or_else(|| "100%".into())
    );
    Ok(())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let (key, public, id) = crate::keygen::keygen(&out)?;
            println!("{}\n{}", key.display(), public.display());
            tracing::info!("created key {id}; keep {} secret, give {} to the deployers", short(&key), short(&public));
        }
        Command::Build(a) => {
            let req = BuildRequest {
                src: a.src,
                key: a.key,
                trust: read_keys(&a.trust)?,
                channel: a.channel,
                repo: a.repo,
                version: a.version_label,
                serial: a.serial,
                level: a.level,
                exclude: a.exclude,
                expires_in: a.expires_in,
                jobs: a.jobs,
                fragments: !a.no_fragments,
                align: a.align,
                rollout: a.rollout.filter(|&p| p < 100),
                reuse: !a.no_reuse,
                deltas: a.deltas as usize,
            };
            let r = build(&req)?;
            if a.json {
                print_json(&r)?;
            } else {
                let p = &r.published;
                println!(
                    "published {} serial {} ({}) to {}\n  image {} ({} bytes, {} inodes, {} bytes of data)\n  blocks: {} reused ({} bytes), {} compressed ({} bytes)\n  sha256 {}\n  expires {}",
                    p.channel,
                    p.serial,
                    p.version,
                    short(&p.manifest),
                    short(&p.image),
                    p.size,
                    r.inodes,
                    r.data_bytes,
                    r.reuse.reused_blocks,
                    r.reuse.reused_bytes,
                    r.reuse.compressed_blocks,
                    r.reuse.compressed_bytes,
                    p.sha256,
                    p.expires
                );
                for d in &r.deltas {
                    println!(
                        "  delta from {}: {} bytes ({} copied, {} patched, {} literal) in {} ms",
                        d.from, d.size, d.copied, d.patched, d.literal, d.ms
                    );
                }
            }
        }
        Command::Verify { manifest, public, json, origin } => {
            let keys = read_keys(&public)?;
            let v = crate::verify::verify(&manifest, &keys, &origin.private_origin())?;
            if json {
                print_json(&v)?;
            } else {
                let m = &v.manifest;
                println!(
                    "ok: {} serial {} ({}) signed by {}, image {} bytes sha256 {}, expires {}",
                    m.channel, m.serial, m.version, v.key_id, m.image.size, m.image.sha256, m.expires
                );
            }
        }
        Command::Inspect { path, blocks, json } => {
            let i = crate::inspect::inspect(&path, blocks)?;
            if json {
                print_json(&i)?;
            } else {
                if let Some(m) = &i.manifest {
                    println!("manifest (signature NOT checked; use `imgbuild verify`):");
                    print!("{}", String::from_utf8_lossy(&m.to_bytes()));
                }
                if let (Some(sb), Some(img)) = (&i.superblock, &i.image) {
                    println!("image {img}: {sb}");
                }
                if let Some(b) = &i.blocks {
                    print!("{}", crate::inspect::describe_blocks(b));
                }
            }
        }
        Command::Netboot {
            manifest,
            channel_url,
            busybox,
            net_modules,
            public,
            kernel,
            modules,
            out,
            init,
            shell,
            cmdline,
            json,
            origin,
        } => {
            let manifest =
                manifest.or_else(|| channel_url.first().cloned()).context("--manifest or --channel-url is required")?;
            let r = crate::netboot::netboot(&crate::netboot::NetbootRequest {
                manifest,
                channel_urls: channel_url,
                busybox,
                net_modules,
                keys: public,
                kernel,
                modules,
                out,
                init,
                shell,
                cmdline,
                origin: origin.private_origin(),
            })?;
            if json {
                print_json(&r)?;
            } else {
                for (name, size) in &r.files {
                    println!("{} ({size} bytes)", r.out.join(name).display());
                }
                let boots = match r.policy.network.as_ref() {
                    Some(n) => format!("the channel's current image from {}", n.urls.join(" ")),
                    None => format!("serial {} ({})", r.manifest.serial, r.manifest.version),
                };
                tracing::info!(
                    "boots {boots}; modules: {}; boot with boot.ipxe, needs at least {} MiB of RAM",
                    r.modules.iter().chain(&r.net_modules).cloned().collect::<Vec<_>>().join(" "),
                    r.min_memory_mib
                );
            }
        }
        Command::Rollout { repo, channel, percent, key, trust, expires_in, json } => {
            let repo = Repo::open(&repo)?;
            let r = crate::channel::rollout(&repo, &key, &read_keys(&trust)?, &channel, percent, expires_in)?;
            report_resigned(&r, json)?;
        }
        Command::Refresh { repo, channel, key, trust, expires_in, json } => {
            let repo = Repo::open(&repo)?;
            let r = crate::channel::refresh(&repo, &key, &read_keys(&trust)?, &channel, expires_in)?;
            report_resigned(&r, json)?;
        }
        Command::Promote { repo, from, to, percent, key, trust, expires_in, json } => {
            let repo = Repo::open(&repo)?;
            let r = crate::channel::promote(&repo, &key, &read_keys(&trust)?, &from, &to, percent, expires_in)?;
            report_resigned(&r, json)?;
        }
        Command::Gc { repo, keep, dry_run, json } => {
            let repo = Repo::open(&repo).context("opening the repository")?;
            let r = crate::gc::gc(&repo, keep, dry_run)?;
            if json {
                print_json(&r)?;
            } else {
                for p in &r.removed {
                    println!("{} {}", if dry_run { "would remove" } else { "removed" }, short(p));
                }
                tracing::info!(
                    "{} referenced, {} unreferenced kept, {} removed ({} bytes)",
                    r.referenced.len(),
                    r.kept.len(),
                    r.removed.len(),
                    r.freed_bytes
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_build() {
        let cli = Cli::try_parse_from([
            "imgbuild",
            "build",
            "/src",
            "--key",
            "k.key",
            "--channel",
            "stable",
            "--repo",
            "/r",
            "--level",
            "19",
            "--exclude",
            "tmp/*",
            "--exclude",
            "*.log",
            "--expires-in",
            "12h",
            "--json",
        ])
        .unwrap();
        let Command::Build(b) = cli.command else { panic!("not build") };
        assert_eq!((b.level, b.exclude.len(), b.expires_in, b.json), (19, 2, Duration::from_secs(12 * 3600), true));
    }

    #[test]
    fn rejects_bad_level_and_missing_args() {
        for args in [
            &["imgbuild", "build", "/s", "--key", "k", "--channel", "c", "--repo", "r", "--level", "23"][..],
            &["imgbuild", "build", "/s", "--key", "k", "--channel", "c", "--repo", "r", "--level", "0"],
            &["imgbuild", "build", "/s", "--key", "k", "--channel", "c"],
            &["imgbuild", "verify", "m.json"],
            &["imgbuild", "build", "/s", "--key", "k", "--channel", "c", "--repo", "r", "--expires-in", "soon"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
