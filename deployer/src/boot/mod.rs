//! Boot mode: `imgdeploy` as `/init` (PID 1) of a netboot initramfs built by
//! `imgbuild netboot`. It is chosen only by being started as `/init` (or by
//! the hidden `imgdeploy boot`), never by being PID 1 alone: a container's
//! entrypoint must not mount /proc and power off. It mounts /proc, /sys and /dev, loads the kernel
//! modules in the recorded order, verifies the manifest's signature and the
//! image's sha256 (refusing to boot anything else), loop-mounts the image
//! read-only from RAM, puts a tmpfs overlay on top for runtime writes (unless
//! `imgdeploy.overlay=0`), and switches root into it, running `/sbin/init`
//! (or `imgdeploy.init=`).
//!
//! What to trust comes from one file the trusted initrd brought, the boot
//! policy ([`imgdeploy_common::netboot`]): the keys, the one channel, the
//! lowest serial, and the sha256 of every module and of the rescue shell.
//! The image archive is unpacked before the initrd and may have added any
//! other file; `/init` opens nothing else. It is linked statically, so
//! nothing runs before these checks.
//!
//! Kernel command line:
//! - `imgdeploy.overlay=0|1` (default 1)
//! - `imgdeploy.init=/path` (default /sbin/init)
//! - `imgdeploy.onfail=poweroff|reboot|shell` (default poweroff; `shell`
//!   needs `imgbuild netboot --shell`)
//! - `imgdeploy.allow_expired=1` boots a manifest past its expiry (default:
//!   refused, since an expired manifest is what a mirror replays)
//! - network mode (an initrd built with `imgbuild netboot --channel-url`):
//!   `imgdeploy.url=URL` (repeatable: mirrors, tried in order; replaces the
//!   built-in URLs), `ip=` (the kernel's syntax; DHCP by default),
//!   `imgdeploy.timeout=SECONDS` (how long to keep retrying, default 600)
//!
//! Two ways to get the image:
//! - offline: from `image.cpio`, an archive the boot loader loaded before
//!   the initrd;
//! - network ([`download`]): the channel's current manifest and image,
//!   fetched at boot over a network brought up by busybox ([`network`]),
//!   so one fixed set of boot files follows the channel.

mod download;
pub mod network;
pub mod params;

use imgdeploy_common::report::one_line;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::{Manifest, Timestamp};
use imgdeploy_common::netboot::{
    BootPolicy, BroughtFile, BOOT_POLICY_PATH, IMAGE_PATH as IMAGE, MANIFEST_PATH as MANIFEST, MAX_BOOT_POLICY_BYTES,
    SIGNATURE_PATH as SIGNATURE,
};
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::trust::verify_signed;
use nix::fcntl::OFlag;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

use crate::config::MountOptions;
use crate::mount::mount_image;
use crate::slot::check_image;

/// finit_module flag for .ko.xz/.ko.zst files (the kernel decompresses them).
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

pub use params::{BootParams, OnFail};

fn mkdir(p: &str) {
    // Already there is fine; any real problem surfaces at the mount that follows.
    let _ = fs::create_dir_all(p);
}

pub(crate) fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<()> {
    mkdir(target);
    mount(Some(src), target, Some(fstype), flags, data).with_context(|| format!("mounting {fstype} at {target}"))
}

/// Opens `path` for reading if it is a regular file: never through a
/// symlink at its end, never blocking on a FIFO an archive planted.
fn open_regular(path: &str) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    if !f.metadata()?.is_file() {
        bail!("{path} is not a regular file");
    }
    Ok(f)
}

/// Opens a file the trusted initrd brought, checking it against the sha256
/// the policy recorded; an archive loaded earlier cannot swap it.
pub(crate) fn open_brought(b: &BroughtFile) -> Result<File> {
    let mut f = open_regular(&b.path)?;
    let (sha, _) = Sha256Digest::of_reader(&mut f).with_context(|| format!("reading {}", b.path))?;
    if sha != b.sha256 {
        bail!("{} has sha256 {sha}, but the initrd brought {}; something replaced it", b.path, b.sha256);
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

/// The boot policy the trusted initrd brought.
fn read_policy() -> Result<BootPolicy> {
    let path = BOOT_POLICY_PATH;
    let mut bytes = Vec::new();
    open_regular(path)?
        .take(MAX_BOOT_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {path}"))?;
    if bytes.len() as u64 > MAX_BOOT_POLICY_BYTES {
        bail!("{path} is larger than {MAX_BOOT_POLICY_BYTES} bytes; rebuild the initrd with imgbuild netboot");
    }
    BootPolicy::from_json(&bytes)
        .with_context(|| format!("{path} is not a boot policy; rebuild the initrd with imgbuild netboot"))
}

/// Loads `modules` in order; returns how many were loaded (an already
/// loaded one is not counted).
fn load_modules(modules: &[BroughtFile]) -> Result<usize> {
    let mut n = 0;
    for m in modules {
        if load_module(m)? {
            n += 1;
        }
    }
    Ok(n)
}

fn load_module(m: &BroughtFile) -> Result<bool> {
    let f = open_brought(m)?;
    let flags = if m.path.ends_with(".ko") {
        ModuleInitFlags::empty()
    } else {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    };
    match finit_module(f.as_fd(), &CString::default(), flags) {
        Ok(()) => Ok(true),
        Err(nix::Error::EEXIST) => Ok(false),
        Err(e) => bail!("loading kernel module {}: {e}", m.path),
    }
}

fn trusted_keys(policy: &BootPolicy) -> Result<Vec<PublicKey>> {
    let origin = Path::new(BOOT_POLICY_PATH);
    let keys = policy.keys.iter().map(|pem| PublicKey::from_pem(pem, origin)).collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        bail!("the boot policy trusts no key; rebuild the initrd with imgbuild netboot --pub");
    }
    Ok(keys)
}

/// Mounts what boot mode needs: /proc, /sys, /dev and /run.
fn mount_basics() -> Result<()> {
    mount_fs("proc", "/proc", "proc", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    // /run holds the image's lower mount and the overlay's writable layer; it
    // moves into the new root whole, so the booted system can inspect them.
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))
}

/// Whether the trusted initrd allows booting `m`: its channel, no older
/// than the serial the initrd was built for, and not expired (unless the
/// command line allows it). The signature was checked before.
fn accept(params: &BootParams, policy: &BootPolicy, m: &Manifest) -> Result<()> {
    if m.channel != policy.channel {
        bail!(
            "the image is channel {} serial {}, but this initrd boots channel {} only; \
             ship that channel's image or URL",
            m.channel,
            m.serial,
            policy.channel
        );
    }
    if m.serial < policy.min_serial {
        bail!(
            "the image is serial {} of channel {}, older than serial {} this initrd was built for; \
             refusing a replayed image (to go back on purpose, build a new initrd for it)",
            m.serial,
            m.channel,
            policy.min_serial
        );
    }
    if m.expires <= Timestamp::now() {
        if !params.allow_expired {
            bail!(
                "manifest serial {} expired at {}; publish a fresh one (imgbuild refresh) or boot with imgdeploy.allow_expired=1",
                m.serial,
                m.expires
            );
        }
        eprintln!(
            "imgdeploy: warning: manifest serial {} expired at {}; booting it (imgdeploy.allow_expired=1)",
            m.serial, m.expires
        );
    }
    Ok(())
}

/// The image `image.cpio` brought, verified.
fn from_archive(params: &BootParams, policy: &BootPolicy, keys: &[PublicKey]) -> Result<(File, String, Manifest)> {
    let bytes =
        fs::read(MANIFEST).with_context(|| format!("reading {MANIFEST}; was image.cpio loaded before initrd.img?"))?;
    let sig = fs::read(SIGNATURE).with_context(|| format!("reading {SIGNATURE}"))?;
    let v = verify_signed(&bytes, &sig, keys)
        .context("the image's manifest does not verify with the keys this initrd trusts")?;
    let m = v.manifest;
    accept(params, policy, &m)?;
    let mut img = open_regular(IMAGE)?;
    check_image(&mut img, &m).with_context(|| format!("image {IMAGE} of serial {}", m.serial))?;
    Ok((img, v.key_id, m))
}

/// The image, from the network (if the initrd or the command line names a
/// URL) or from `image.cpio`, verified and mounted at /newroot; returns the
/// init to run.
fn prepare(params: &BootParams, policy: &BootPolicy) -> Result<String> {
    let n = load_modules(&policy.modules)?;
    eprintln!("imgdeploy: loaded {n} kernel modules");
    let keys = trusted_keys(policy)?;
    let urls: &[String] = match (&params.urls, &policy.network) {
        (urls, _) if !urls.is_empty() => urls,
        (_, Some(net)) => &net.urls,
        (_, None) => &[],
    };
    let (img, path, key_id, m) = if urls.is_empty() {
        let (img, key_id, m) = from_archive(params, policy, &keys)?;
        (img, PathBuf::from(IMAGE), key_id, m)
    } else {
        let net = policy.network.as_ref().context(
            "imgdeploy.url= is set, but this initrd has no network support (no busybox, no NIC drivers); \
             rebuild it with imgbuild netboot --channel-url",
        )?;
        let mut loaded = 0;
        for m in &net.modules {
            match load_module(m) {
                Ok(true) => loaded += 1,
                Ok(false) => {}
                Err(e) => eprintln!("imgdeploy: warning: {}", one_line(e.as_ref())),
            }
        }
        eprintln!(
            "imgdeploy: loaded {loaded} network drivers; fetching channel {} from {}",
            policy.channel,
            urls.join(" ")
        );
        let d = download::fetch_current(params, policy, net, &keys, urls)?;
        (d.file, d.path, d.key_id, d.manifest)
    };
    eprintln!(
        "imgdeploy: verified channel {} serial {} ({}) sha256 {} signed by {key_id}",
        m.channel, m.serial, m.version, m.image.sha256
    );

    let opts = MountOptions::PERMISSIVE;
    let label = format!("imgdeploy:boot:{}", m.serial);
    let path = path.as_path();
    if params.overlay {
        mkdir("/run/imgdeploy/lower");
        mount_image(&img, m.image.format, path, Path::new("/run/imgdeploy/lower"), opts, &label, None)?;
        mkdir("/run/imgdeploy/rw/upper");
        mkdir("/run/imgdeploy/rw/work");
        mount_fs(
            "overlay",
            "/newroot",
            "overlay",
            MsFlags::empty(),
            Some("lowerdir=/run/imgdeploy/lower,upperdir=/run/imgdeploy/rw/upper,workdir=/run/imgdeploy/rw/work"),
        )?;
    } else {
        mkdir("/newroot");
        mount_image(&img, m.image.format, path, Path::new("/newroot"), opts, &label, None)?;
    }
    let init_in_root = format!("/newroot{}", params.init);
    if fs::symlink_metadata(&init_in_root).is_err() {
        bail!("the image has no {} to run (set imgdeploy.init=)", params.init);
    }
    Ok(params.init.clone())
}

/// Moves the new root over `/` and execs its init. Returns only on error.
fn switch_root(init: &str) -> Result<std::convert::Infallible> {
    for d in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("/newroot{d}");
        if Path::new(&target).is_dir() {
            // Keep the mounts reachable in the new root; where the image has no
            // such directory they stay behind, still alive, under the old root.
            mount(Some(d), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .with_context(|| format!("moving {d} into the new root"))?;
        }
    }
    nix::unistd::chdir("/newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("moving the new root over /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    nix::unistd::chdir("/")?;
    let prog = CString::new(init)?;
    let err = nix::unistd::execv(&prog, std::slice::from_ref(&prog)).unwrap_err();
    bail!("cannot run {init}: {err}")
}

fn fail(params: &BootParams, shell: Option<&BroughtFile>) -> ! {
    use nix::sys::reboot::{reboot, RebootMode};
    nix::unistd::sync();
    if params.onfail == OnFail::Shell {
        // Only the shell the trusted initrd brought: an archive loaded
        // before it could have put any program at /bin/sh.
        match shell {
            Some(s) => match open_brought(s) {
                Ok(_) => {
                    eprintln!("imgdeploy: dropping to a shell");
                    let sh = CString::new(s.path.as_str()).expect("the boot policy's paths have no NUL");
                    let _ = nix::unistd::execv(&sh, std::slice::from_ref(&sh));
                }
                Err(e) => eprintln!("imgdeploy: not running the shell: {}", one_line(e.as_ref())),
            },
            None => eprintln!("imgdeploy: no shell: the initrd was built without imgbuild netboot --shell"),
        }
    }
    let (mode, doing) = match params.onfail {
        OnFail::Reboot => (RebootMode::RB_AUTOBOOT, "rebooting"),
        OnFail::PowerOff | OnFail::Shell => (RebootMode::RB_POWER_OFF, "powering off"),
    };
    eprintln!("imgdeploy: {doing}");
    let _ = reboot(mode);
    // PID 1 must never exit; if even reboot failed, wait forever.
    loop {
        std::thread::park();
    }
}

/// `imgdeploy` started as `/init`: boot mode as PID 1, or, when udhcpc runs
/// `/init` as its lease script, that script ([`network::dhcp_event`]).
pub fn init_main() -> ! {
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    if let Some(event) = network::dhcp_event(&args) {
        std::process::exit(network::handle_dhcp_event(event));
    }
    boot_main()
}

/// Runs boot mode. Never returns.
pub fn boot_main() -> ! {
    let cmdline = {
        mkdir("/proc");
        // /proc is not mounted yet; mount it just to read the command line.
        let _ = mount(Some("proc"), "/proc", Some("proc"), MsFlags::empty(), None::<&str>);
        let c = fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let _ = nix::mount::umount("/proc");
        c
    };
    let (params, bad_words) = BootParams::parse_all(&cmdline);
    eprintln!("imgdeploy {}: netboot, overlay={}, init={}", env!("CARGO_PKG_VERSION"), params.overlay, params.init);
    let policy = mount_basics().and_then(|()| read_policy());
    let result = match (&policy, bad_words.first()) {
        (_, Some(bad)) => Err(anyhow::anyhow!("{bad}")),
        (Ok(policy), None) => prepare(&params, policy).and_then(|init| switch_root(&init).map(|_| ())),
        (Err(e), None) => Err(anyhow::anyhow!("{}", one_line(e.as_ref()))),
    };
    if let Err(e) = result {
        eprintln!("imgdeploy: REFUSING TO BOOT: {}", one_line(e.as_ref()));
    }
    fail(&params, policy.as_ref().ok().and_then(|p| p.shell.as_ref()))
}
