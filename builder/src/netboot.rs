//! `imgbuild netboot`: artifacts that boot a diskless machine straight from a
//! signed image held in RAM.
//!
//! - `initrd.img`: a zstd-compressed newc cpio with `/init` (a statically
//!   linked `imgdeploy`, which runs its boot mode as PID 1), the kernel
//!   modules for loop, squashfs and overlay (with their dependencies, from
//!   `modules.dep`), the boot policy (trusted keys, channel, lowest serial,
//!   and the sha256 of every module and of the optional shell: see
//!   [`imgdeploy_common::netboot`]) and a `/dev/console` node;
//! - `image.cpio`: an uncompressed cpio with the signed manifest, its
//!   signature and the image, so the image can be shipped separately and
//!   concatenated by the boot loader (a concatenation of cpio archives is one
//!   initramfs to the kernel; the uncompressed one goes first);
//! - `initrd-combined.img`: `image.cpio` then `initrd.img`, for boot loaders that take one initrd;
//! - `vmlinuz`, `boot.ipxe` and `netboot.json` (a summary).
//!
//! The manifest is verified (signature and expiry) and the image hashed while
//! it is packed; nothing is left in OUTDIR if either check fails. `/init` must
//! be static: a dynamic one would run whatever an earlier archive put in
//! `/etc/ld.so.preload` before checking anything. Every file is written under
//! a random temporary name (created exclusively, so a planted symlink is never
//! followed) and renamed into place.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use imgdeploy_common::atomic::fsync_dir;
use imgdeploy_common::digest::{HashingReader, Sha256Digest};
use imgdeploy_common::location::Location;
use imgdeploy_common::manifest::{ImageFormat, Manifest, Timestamp};
use imgdeploy_common::netboot::{
    member, BootPolicy, BroughtFile, NetworkPolicy, BOOT_POLICY_PATH, BUSYBOX_PATH, IMAGE_PATH, MANIFEST_PATH,
    SIGNATURE_PATH,
};
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::transport::{PrivateOrigin, Transport};

use crate::cpio::CpioWriter;

/// Modules the boot mode needs for an image of `format` (plus their dependencies).
pub fn boot_modules(format: ImageFormat) -> [&'static str; 3] {
    ["loop", format.kernel_module(), "overlay"]
}
/// Network drivers network mode brings when the kernel has them as modules:
/// virtual machines' and the common server NICs'.
pub const DEFAULT_NET_MODULES: [&str; 7] = ["virtio_pci", "virtio_net", "e1000", "e1000e", "igb", "ixgbe", "mlx5_core"];
/// Where Debian's busybox-static installs busybox (`--busybox` overrides it).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Where the Debian package installs the static `/init` (`--init` overrides it).
pub const DEFAULT_INIT: &str = "/usr/lib/imgdeploy/netboot-init";

/// What to build.
#[derive(Debug, Clone)]
pub struct NetbootRequest {
    /// Manifest path or URL.
    pub manifest: String,
    /// Trusted public keys (also embedded).
    pub keys: Vec<PathBuf>,
    /// Kernel image.
    pub kernel: PathBuf,
    /// `/lib/modules/<version>` of that kernel.
    pub modules: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// The statically linked `imgdeploy` to run as `/init` (default [`DEFAULT_INIT`]).
    pub init: Option<PathBuf>,
    /// A static shell (e.g. `/bin/busybox`) for `imgdeploy.onfail=shell`.
    pub shell: Option<PathBuf>,
    /// Extra kernel command line for `boot.ipxe`.
    pub cmdline: String,
    /// Credentials for a private origin.
    pub origin: PrivateOrigin,
    /// Network mode: the channel manifest URLs `/init` fetches at boot, in
    /// order. Empty: offline mode (the image travels in `image.cpio`).
    pub channel_urls: Vec<String>,
    /// Network mode: a static busybox (default [`DEFAULT_BUSYBOX`]).
    pub busybox: Option<PathBuf>,
    /// Network mode: more network drivers, beyond [`DEFAULT_NET_MODULES`].
    pub net_modules: Vec<String>,
}

/// What was written.
#[derive(Debug, serde::Serialize)]
pub struct NetbootReport {
    /// Output directory.
    pub out: PathBuf,
    /// Files written, with sizes.
    pub files: Vec<(String, u64)>,
    /// Kernel modules included, in load order.
    pub modules: Vec<String>,
    /// What `/init` will boot: keys, channel, lowest serial, and the files it checks.
    pub policy: BootPolicy,
    /// The image's manifest.
    pub manifest: Manifest,
    /// Network drivers included (network mode), in load order.
    pub net_modules: Vec<String>,
    /// A floor for the machine's memory. Offline: the kernel unpacks the
    /// initramfs while still holding it, so about twice the image plus room
    /// to run. Network mode: the image once, plus room to run.
    pub min_memory_mib: u64,
}

/// The network drivers for network mode: the defaults this kernel has, and
/// every one asked for (which must exist), with their dependencies, minus
/// what `already` loads.
pub fn net_modules(modules_dir: &Path, extra: &[String], already: &[String]) -> Result<Vec<String>> {
    let mut wanted: Vec<&str> =
        DEFAULT_NET_MODULES.into_iter().filter(|m| resolve_modules(modules_dir, &[m]).is_ok()).collect();
    wanted.extend(extra.iter().map(String::as_str));
    let all = resolve_modules(modules_dir, &wanted)?;
    Ok(all.into_iter().filter(|m| !already.contains(m)).collect())
}

/// Resolves `wanted` modules and their dependencies from `modules.dep`,
/// dependencies first. Built-in modules (in `modules.builtin`) are skipped.
pub fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let dep_path = modules_dir.join("modules.dep");
    let deps_text = fs::read_to_string(&dep_path)
        .with_context(|| format!("reading {}; --modules must be /lib/modules/<kernel version>", dep_path.display()))?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let norm = |s: &str| s.replace('-', "_");
    let stem = |p: &str| {
        let base = p.rsplit('/').next().unwrap_or(p);
        norm(base.split(".ko").next().unwrap_or(base))
    };
    let mut by_name: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in deps_text.lines() {
        let Some((m, d)) = line.split_once(':') else { continue };
        by_name.insert(stem(m), (m.to_owned(), d.split_whitespace().map(str::to_owned).collect()));
    }
    let builtin: BTreeSet<String> = builtin.lines().map(stem).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        by_name: &HashMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        stem: &dyn Fn(&str) -> String,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, deps)) = by_name.get(name) {
            for d in deps {
                visit(&stem(d), by_name, seen, order, stem);
            }
            order.push(path.clone());
        }
    }
    for w in wanted {
        let n = norm(w);
        if !by_name.contains_key(&n) && !builtin.contains(&n) {
            bail!(
                "kernel module `{w}` is neither in {} nor built in; check its name, and that --modules belongs to --kernel",
                dep_path.display()
            );
        }
        visit(&n, &by_name, &mut seen, &mut order, &stem);
    }
    Ok(order)
}

/// The shared libraries `binary` needs, as `ldd` lists them (absolute paths).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd (package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let said = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if said.contains("not a dynamic executable") || said.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{} needs a library that is not installed: {line}", binary.display());
        }
    }
    Ok(libs)
}

/// Packs the file `src` as `name`; returns the sha256 of exactly the bytes packed.
fn add_file(w: &mut CpioWriter<impl Write>, name: &str, src: &Path, perm: u32) -> Result<Sha256Digest> {
    w.parent_dirs(name)?;
    let f = File::open(src).with_context(|| format!("reading {}", src.display()))?;
    let len = f.metadata()?.len();
    let mut hashing = HashingReader::new(f);
    w.file(name, perm, len, &mut hashing).with_context(|| format!("packing {}", src.display()))?;
    Ok(hashing.finish().0)
}

/// Packs the modules `rels` (paths relative to `modules_dir`) under
/// `/lib/modules/`, each with the sha256 of the bytes packed.
fn add_modules(w: &mut CpioWriter<impl Write>, modules_dir: &Path, rels: &[String]) -> Result<Vec<BroughtFile>> {
    rels.iter()
        .map(|rel| {
            let path = format!("/lib/modules/{rel}");
            let sha256 = add_file(w, member(&path), &modules_dir.join(rel), 0o644)?;
            Ok(BroughtFile { path, sha256 })
        })
        .collect()
}

/// Writes `dir/name` atomically through `f`, returning its size. The
/// temporary file has a random name and is created exclusively.
fn write_out(dir: &Path, name: &str, f: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<u64> {
    let (file, tmp) = tempfile::Builder::new()
        .prefix(&format!(".tmp-{name}-"))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?
        .into_parts();
    let mut w = BufWriter::with_capacity(1 << 20, file);
    // On error `tmp` is dropped, which removes the half-written file.
    f(&mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    let len = file.metadata()?.len();
    let dest = dir.join(name);
    tmp.persist(&dest).with_context(|| format!("renaming into {}", dest.display()))?;
    Ok(len)
}

/// `binary` without its debug sections (as `tmpdir/init`), when objcopy is
/// available; otherwise `binary` itself.
pub fn stripped(binary: &Path, tmpdir: &Path) -> PathBuf {
    let dst = tmpdir.join("init");
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&dst)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        dst
    } else {
        binary.to_owned()
    }
}

/// Builds the netboot artifacts.
pub fn netboot(req: &NetbootRequest) -> Result<NetbootReport> {
    let keys: Vec<PublicKey> = req.keys.iter().map(|p| PublicKey::read(p)).collect::<Result<_, _>>()?;
    let transport = Transport::new(&req.origin, Duration::from_secs(60), Duration::from_secs(4 * 3600))?;
    let loc = Location::parse(&req.manifest);
    let signed = loc.fetch_verified_manifest(&transport, &keys, Timestamp::now())?;
    let (manifest_bytes, sig, m) = (signed.bytes, signed.signature, signed.verified.manifest);
    let init = req.init.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_INIT));
    if !init.is_file() {
        bail!(
            "init binary {} does not exist; build a static one with scripts/build-netboot-init.sh and pass --init",
            init.display()
        );
    }
    if !req.kernel.is_file() {
        bail!("kernel {} does not exist", req.kernel.display());
    }
    let modules = resolve_modules(&req.modules, &boot_modules(m.image.format))?;
    let network_mode = !req.channel_urls.is_empty();
    for u in &req.channel_urls {
        if !Location::is_http_url(u) || u.chars().any(char::is_whitespace) {
            bail!("--channel-url {u} is not an http:// or https:// URL");
        }
    }
    let (nics, busybox) = if network_mode {
        if req.origin.files().next().is_some() {
            bail!(
                "--channel-url with private-origin credentials: network mode fetches from public origins only \
                 (an initrd is no place for a secret); serve the channel without them, or use the offline mode"
            );
        }
        let bb = req.busybox.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX));
        if !bb.is_file() {
            bail!("busybox {} does not exist; install busybox-static or pass --busybox", bb.display());
        }
        if !shared_libraries(&bb)?.is_empty() {
            bail!("busybox {} is dynamically linked; use the static one (package busybox-static)", bb.display());
        }
        (net_modules(&req.modules, &req.net_modules, &modules)?, Some(bb))
    } else {
        if !req.net_modules.is_empty() || req.busybox.is_some() {
            bail!("--net-modules and --busybox are for network mode; add --channel-url");
        }
        (Vec::new(), None)
    };
    fs::create_dir_all(&req.out).with_context(|| format!("creating {}", req.out.display()))?;
    let out = fs::canonicalize(&req.out)?;
    let scratch = tempfile::tempdir_in(&out)?;
    let init_bin = stripped(&init, scratch.path());
    if !shared_libraries(&init_bin)?.is_empty() {
        bail!(
            "init binary {} is dynamically linked, so an archive loaded before the initrd could run code as PID 1 \
             through /etc/ld.so.preload; build a static one with scripts/build-netboot-init.sh and pass --init",
            init.display()
        );
    }
    let key_pems: Vec<String> = keys.iter().map(|k| k.to_pem()).collect::<Result<_, _>>()?;
    // Filled in while the initrd is written: the hashes are of the very bytes packed.
    let mut policy = None;

    let mut files = Vec::new();
    // 1. The base initrd.
    let initrd_len = write_out(&out, "initrd.img", |w| {
        let z = zstd::Encoder::new(w, 9)?;
        let mut c = CpioWriter::new(z);
        for d in ["dev", "proc", "sys", "run", "newroot", "etc", "etc/imgdeploy", "lib", "lib/modules", "imgdeploy"] {
            c.dir(d, 0o755)?;
        }
        // The kernel opens /dev/console for PID 1 before anything is mounted.
        c.char_dev("dev/console", 0o600, 5, 1)?;
        add_file(&mut c, "init", &init_bin, 0o755)?;
        let brought = add_modules(&mut c, &req.modules, &modules)?;
        let shell = match &req.shell {
            Some(sh) => Some(BroughtFile { path: "/bin/sh".into(), sha256: add_file(&mut c, "bin/sh", sh, 0o755)? }),
            None => None,
        };
        let network = match &busybox {
            Some(bb) => {
                let busybox = BroughtFile {
                    path: BUSYBOX_PATH.into(),
                    sha256: add_file(&mut c, member(BUSYBOX_PATH), bb, 0o755)?,
                };
                let drivers = add_modules(&mut c, &req.modules, &nics)?;
                Some(NetworkPolicy { urls: req.channel_urls.clone(), busybox, modules: drivers })
            }
            None => None,
        };
        let p = BootPolicy {
            channel: m.channel.clone(),
            min_serial: m.serial,
            keys: key_pems,
            modules: brought,
            shell,
            network,
        };
        let json = serde_json::to_vec_pretty(&p)?;
        c.file(member(BOOT_POLICY_PATH), 0o644, json.len() as u64, &json[..])?;
        policy = Some(p);
        let w = c.finish()?.finish()?;
        // Archives that follow must start 4-byte aligned; zeros between them are skipped.
        let len = w.get_ref().metadata()?.len() + w.buffer().len() as u64;
        w.write_all(&vec![0u8; ((512 - len % 512) % 512) as usize])?;
        Ok(())
    })?;
    files.push(("initrd.img".to_owned(), initrd_len));

    // 2. The image cpio, hashing the image as it is packed (offline mode only).
    let img_loc = loc.sibling(&m.image.path);
    if !network_mode {
        let image_len = write_out(&out, "image.cpio", |w| {
            let mut c = CpioWriter::new(w);
            c.dir("imgdeploy", 0o755)?;
            c.file(member(MANIFEST_PATH), 0o644, manifest_bytes.len() as u64, &manifest_bytes[..])?;
            c.file(member(SIGNATURE_PATH), 0o644, sig.len() as u64, &sig[..])?;
            let (reader, _) = img_loc.open(&transport, 0)?;
            let mut h = HashingReader::new(reader.take(m.image.size + 1));
            c.file(member(IMAGE_PATH), 0o444, m.image.size, &mut h)
                .with_context(|| format!("packing image {img_loc}"))?;
            let mut extra = [0u8; 1];
            if h.read(&mut extra)? != 0 {
                bail!("image {img_loc} is longer than its manifest says");
            }
            let (sha, _) = h.finish();
            if sha != m.image.sha256 {
                bail!(
                    "image {img_loc} has sha256 {sha} but the manifest signs {}; refusing to package it",
                    m.image.sha256
                );
            }
            c.finish()?;
            Ok(())
        })?;
        files.push(("image.cpio".to_owned(), image_len));

        // 3. Both in one file: the uncompressed archive first, as with early
        //    microcode, so the kernel never has to find an archive after a compressed stream.
        let combined_len = write_out(&out, "initrd-combined.img", |w| {
            for part in ["image.cpio", "initrd.img"] {
                io::copy(&mut File::open(out.join(part))?, w)?;
            }
            Ok(())
        })?;
        files.push(("initrd-combined.img".to_owned(), combined_len));
    }

    let kernel_len = write_out(&out, "vmlinuz", |w| {
        io::copy(&mut File::open(&req.kernel)?, w)?;
        Ok(())
    })?;
    files.push(("vmlinuz".to_owned(), kernel_len));

    let cmdline = format!("console=tty0 console=ttyS0 {}", req.cmdline).trim().to_owned();
    let ipxe = if network_mode {
        format!(
            "#!ipxe\n# Boots channel {}'s current image (serial {} or later) from {}, into RAM.\n\
             # Files are fetched relative to this script's URL.\n\
             kernel vmlinuz initrd=initrd.img {cmdline}\ninitrd initrd.img\nboot\n",
            m.channel,
            m.serial,
            req.channel_urls.join(" ")
        )
    } else {
        format!(
            "#!ipxe\n# Boots channel {} serial {} ({}) from RAM. Files are fetched relative to this script's URL.\n\
             kernel vmlinuz initrd=image.cpio initrd=initrd.img {cmdline}\ninitrd image.cpio\ninitrd initrd.img\nboot\n",
            m.channel, m.serial, m.version
        )
    };
    let ipxe_len = write_out(&out, "boot.ipxe", |w| Ok(w.write_all(ipxe.as_bytes())?))?;
    files.push(("boot.ipxe".to_owned(), ipxe_len));

    let report = NetbootReport {
        out: out.clone(),
        files,
        modules: modules.clone(),
        policy: policy.expect("the policy is written with the initrd"),
        net_modules: nics,
        min_memory_mib: ((if network_mode { 1 } else { 2 }) * m.image.size + initrd_len) / (1 << 20) + 256,
        manifest: m,
    };
    let summary = serde_json::to_vec_pretty(&report)?;
    write_out(&out, "netboot.json", |w| Ok(w.write_all(&summary)?))?;
    drop(scratch);
    fsync_dir(&out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("modules.dep"),
            "kernel/fs/overlayfs/overlay.ko:\nkernel/fs/squashfs/squashfs.ko.xz: kernel/lib/zstd/zstd_decompress.ko.xz\nkernel/lib/zstd/zstd_decompress.ko.xz:\n",
        )
        .unwrap();
        fs::write(d.path().join("modules.builtin"), "kernel/drivers/block/loop.ko\n").unwrap();
        let order = resolve_modules(d.path(), &boot_modules(ImageFormat::Squashfs)).unwrap();
        assert_eq!(
            order,
            [
                "kernel/lib/zstd/zstd_decompress.ko.xz",
                "kernel/fs/squashfs/squashfs.ko.xz",
                "kernel/fs/overlayfs/overlay.ko"
            ]
        );
        fs::write(d.path().join("modules.builtin"), "").unwrap();
        let e = resolve_modules(d.path(), &boot_modules(ImageFormat::Squashfs)).unwrap_err().to_string();
        assert!(e.contains("`loop`"), "{e}");
    }
}
