//! PXE/ramdisk variant: build netboot artifacts for a tiny image
//! whose /sbin/init is a static busybox script, boot them in qemu (TCG), and
//! check the marker; a flipped byte in the image must stop the boot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use imgdeploy_builder::cpio::CpioWriter;
use imgdeploy_tests::qemu::{self, prerequisites};
use imgdeploy_tests::{bin, build_image, netboot_init, run, run_bin, Keys, Run};

fn boot(kernel: &Path, initrd: &Path, append: &str) -> String {
    qemu::boot(kernel, initrd, append, &[], 90)
}

/// A tree whose /sbin/init (a busybox script) prints
/// `IMGDEPLOY-MARKER version=<version> write=ok|refused` and powers off.
fn marker_tree(dir: &Path, version: &str) -> PathBuf {
    let tree = dir.join(format!("tree-{version}"));
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp"] {
        fs::create_dir_all(tree.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    fs::write(
        tree.join("sbin/init"),
        "#!/bin/busybox sh\n/bin/busybox echo \"IMGDEPLOY-MARKER version=$(/bin/busybox cat /etc/image-version) write=$(/bin/busybox touch /tmp/w 2>/dev/null && /bin/busybox echo ok || /bin/busybox echo refused)\"\n/bin/busybox poweroff -f\n",
    )
    .unwrap();
    run(Command::new("chmod").arg("755").arg(tree.join("sbin/init"))).ok();
    fs::write(tree.join("etc/image-version"), version).unwrap();
    tree
}

/// Runs `imgbuild netboot` for `manifest`, trusting `public`, into `out`, with `init` as /init.
fn netboot_run(
    manifest: &Path,
    public: &Path,
    kernel: &Path,
    modules: &Path,
    out: &Path,
    init: &Path,
    extra: &[&str],
) -> Run {
    let paths = [manifest, public, kernel, modules, out, init].map(|p| p.to_str().unwrap().to_owned());
    let mut args: Vec<&str> = vec!["netboot", "--manifest", &paths[0], "--pub", &paths[1], "--kernel", &paths[2]];
    args.extend(["--modules", &paths[3], "--out", &paths[4], "--init", &paths[5], "--json"]);
    args.extend(extra);
    run_bin("imgbuild", args)
}

/// `imgbuild netboot` with the static init; its JSON summary.
fn netboot(
    manifest: &Path,
    public: &Path,
    kernel: &Path,
    modules: &Path,
    out: &Path,
    extra: &[&str],
) -> serde_json::Value {
    netboot_run(manifest, public, kernel, modules, out, &netboot_init(), extra).ok().json()
}

/// A newc cpio archive of `(path, mode, bytes)` files (parents created 0755).
fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut w = CpioWriter::new(Vec::new());
    for (name, perm, bytes) in files {
        w.parent_dirs(name).unwrap();
        w.file(name, *perm, bytes.len() as u64, *bytes).unwrap();
    }
    w.finish().unwrap()
}

/// Writes the concatenation of `parts` (each padded to 4 bytes) to `dst`.
fn concat(dst: &Path, parts: &[Vec<u8>]) -> PathBuf {
    let mut all = Vec::new();
    for p in parts {
        all.extend_from_slice(p);
        all.resize(all.len().div_ceil(4) * 4, 0);
    }
    fs::write(dst, all).unwrap();
    dst.to_owned()
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn privileged_netboot_boots_the_signed_image_in_qemu() {
    let Some((kernel, modules)) = prerequisites("privileged_netboot_boots_the_signed_image_in_qemu") else { return };
    let work = tempfile::tempdir().unwrap();
    let tree = marker_tree(work.path(), "nb-42");
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    build_image(&tree, &keys, "stable", &repo, &["--version", "nb-42"]);
    let out = work.path().join("out");
    let r = netboot(&repo.join("stable.json"), &keys.public, &kernel, &modules, &out, &[]);
    assert!(r["modules"].as_array().unwrap().iter().any(|m| m.as_str().unwrap().ends_with("squashfs.ko")), "{r}");
    for f in ["initrd.img", "image.cpio", "initrd-combined.img", "vmlinuz", "boot.ipxe", "netboot.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let ipxe = fs::read_to_string(out.join("boot.ipxe")).unwrap();
    assert!(
        ipxe.starts_with("#!ipxe") && ipxe.contains("initrd image.cpio") && ipxe.contains("initrd initrd.img"),
        "{ipxe}"
    );

    // Boots, with a writable tmpfs overlay.
    let log = boot(&out.join("vmlinuz"), &out.join("initrd-combined.img"), "");
    assert!(log.contains("imgdeploy: verified channel stable serial 1 (nb-42)"), "{log}");
    assert!(log.contains("IMGDEPLOY-MARKER version=nb-42 write=ok"), "{log}");
    // Read-only when asked.
    let log = boot(&out.join("vmlinuz"), &out.join("initrd-combined.img"), "imgdeploy.overlay=0");
    assert!(log.contains("IMGDEPLOY-MARKER version=nb-42 write=refused"), "{log}");

    // One flipped byte in the image: the boot is refused, nothing runs.
    let mut cpio = read(&out.join("image.cpio"));
    let at = cpio.windows(4).position(|w| w == b"hsqs").expect("image inside image.cpio") + 3000;
    cpio[at] ^= 0x01;
    let tampered = concat(&work.path().join("tampered.img"), &[cpio, read(&out.join("initrd.img"))]);
    let log = boot(&out.join("vmlinuz"), &tampered, "");
    assert!(log.contains("imgdeploy: REFUSING TO BOOT") && log.contains("its manifest says"), "{log}");
    assert!(!log.contains("IMGDEPLOY-MARKER"), "a tampered image was booted:\n{log}");
}

/// Whoever ships `image.cpio` (a mirror, the PXE
/// server) but not the signing key or the trusted `initrd.img` must not get
/// anything booted that the initrd's builder did not allow: not an image
/// signed by a key the archive adds, not another channel, not an older
/// serial, not an expired manifest (unless the command line says so), and
/// not a program the archive brings.
#[test]
fn privileged_netboot_boots_only_what_the_trusted_initrd_allows() {
    let Some((kernel, modules)) = prerequisites("privileged_netboot_boots_only_what_the_trusted_initrd_allows") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let ours = Keys::generate();
    let theirs = Keys::generate();
    let repo = work.path().join("repo");
    build_image(&marker_tree(work.path(), "good-1"), &ours, "stable", &repo, &["--version", "good-1"]);
    let old = work.path().join("old");
    netboot(&repo.join("stable.json"), &ours.public, &kernel, &modules, &old, &[]);
    build_image(&marker_tree(work.path(), "good-2"), &ours, "stable", &repo, &["--version", "good-2"]);
    let out = work.path().join("out");
    let r = netboot(&repo.join("stable.json"), &ours.public, &kernel, &modules, &out, &[]);
    let initrd = read(&out.join("initrd.img"));
    let vmlinuz = out.join("vmlinuz");
    let log = boot(&vmlinuz, &out.join("initrd-combined.img"), "");
    assert!(log.contains("IMGDEPLOY-MARKER version=good-2"), "{log}");

    // 1. Their own key and their own signed image: the key goes where /init
    //    looked for keys, with a policy of their own and an ld.so.preload.
    let evil_repo = work.path().join("evil-repo");
    build_image(
        &marker_tree(work.path(), "evil"),
        &theirs,
        "stable",
        &evil_repo,
        &["--version", "evil", "--serial", "99"],
    );
    let evil = work.path().join("evil");
    netboot(&evil_repo.join("stable.json"), &theirs.public, &kernel, &modules, &evil, &[]);
    let their_pem = read(&theirs.public);
    let extras = cpio(&[
        ("etc/imgdeploy/keys/zz-theirs.pub", 0o644, &their_pem),
        ("etc/imgdeploy/keys/trusted-9.pub", 0o644, &their_pem),
        ("etc/ld.so.preload", 0o644, b"/lib/x86_64-linux-gnu/libevil.so\n"),
    ]);
    let attack = concat(&work.path().join("attack-key.img"), &[read(&evil.join("image.cpio")), extras, initrd.clone()]);
    let log = boot(&vmlinuz, &attack, "");
    assert!(
        log.contains("REFUSING TO BOOT") && log.contains("does not verify"),
        "key injection: no refusal naming the signature:\n{log}"
    );
    assert!(!log.contains("IMGDEPLOY-MARKER"), "an image signed by a key the archive brought was booted:\n{log}");

    // 2. Our key, another channel.
    let beta_repo = work.path().join("beta-repo");
    build_image(&marker_tree(work.path(), "beta"), &ours, "beta", &beta_repo, &["--version", "beta", "--serial", "99"]);
    let beta = work.path().join("beta");
    netboot(&beta_repo.join("beta.json"), &ours.public, &kernel, &modules, &beta, &[]);
    let attack = concat(&work.path().join("attack-channel.img"), &[read(&beta.join("image.cpio")), initrd.clone()]);
    let log = boot(&vmlinuz, &attack, "");
    assert!(
        log.contains("REFUSING TO BOOT") && log.contains("channel beta"),
        "another channel: no refusal naming it:\n{log}"
    );
    assert!(!log.contains("IMGDEPLOY-MARKER"), "another channel's image was booted:\n{log}");

    // 3. Our key, our channel, an older serial.
    let attack = concat(&work.path().join("attack-replay.img"), &[read(&old.join("image.cpio")), initrd.clone()]);
    let log = boot(&vmlinuz, &attack, "");
    assert!(log.contains("REFUSING TO BOOT") && log.contains("serial 1"), "older serial: no refusal naming it:\n{log}");
    assert!(!log.contains("IMGDEPLOY-MARKER"), "an older serial was booted:\n{log}");

    // 4. A shell the archive brings, with a command line asking for it on failure.
    let mut image = read(&out.join("image.cpio"));
    let at = image.windows(4).position(|w| w == b"hsqs").unwrap() + 3000;
    image[at] ^= 1;
    let busybox = read(Path::new("/bin/busybox"));
    let planted = cpio(&[
        ("bin/busybox", 0o755, &busybox),
        ("bin/sh", 0o755, b"#!/bin/busybox sh\n/bin/busybox echo PLANTED-SHELL-RAN\n/bin/busybox poweroff -f\n"),
    ]);
    let attack = concat(&work.path().join("attack-shell.img"), &[image, planted, initrd.clone()]);
    let log = boot(&vmlinuz, &attack, "imgdeploy.onfail=shell");
    assert!(log.contains("REFUSING TO BOOT"), "planted shell: no refusal:\n{log}");
    assert!(!log.contains("PLANTED-SHELL-RAN"), "a shell the archive brought was run as PID 1:\n{log}");

    // 5. Expired: refused unless the command line allows it.
    build_image(
        &marker_tree(work.path(), "good-3"),
        &ours,
        "stable",
        &repo,
        &["--version", "good-3", "--expires-in", "25s"],
    );
    let short = work.path().join("short");
    let started = std::time::Instant::now();
    netboot(&repo.join("stable.json"), &ours.public, &kernel, &modules, &short, &[]);
    std::thread::sleep(std::time::Duration::from_secs(27).saturating_sub(started.elapsed()));
    let log = boot(&short.join("vmlinuz"), &short.join("initrd-combined.img"), "");
    assert!(
        log.contains("REFUSING TO BOOT") && log.contains("expired"),
        "expired manifest: no refusal naming the expiry:\n{log}"
    );
    assert!(!log.contains("IMGDEPLOY-MARKER"), "an expired manifest was booted:\n{log}");
    let log = boot(&short.join("vmlinuz"), &short.join("initrd-combined.img"), "imgdeploy.allow_expired=1");
    assert!(log.contains("IMGDEPLOY-MARKER version=good-3"), "{log}");
    // What the initrd allows is in the summary.
    assert_eq!((r["policy"]["channel"].as_str(), r["policy"]["min_serial"].as_u64()), (Some("stable"), Some(2)), "{r}");
}

/// A dynamically linked /init would let an earlier archive's
/// /etc/ld.so.preload run code as PID 1 before any check: refused.
#[test]
fn netboot_refuses_a_dynamically_linked_init() {
    let work = tempfile::tempdir().unwrap();
    let (keys, repo) = one_file_repo(work.path());
    let (kernel, modules) = fake_kernel(work.path());
    let out = work.path().join("out");
    netboot_run(&repo.join("stable.json"), &keys.public, &kernel, &modules, &out, &bin("imgdeploy"), &[])
        .fails_with("dynamically linked");
    assert!(!out.join("initrd.img").exists());
}

/// Output names are not predictable paths that follow symlinks.
#[test]
fn netboot_temp_files_do_not_follow_planted_symlinks() {
    let work = tempfile::tempdir().unwrap();
    let (keys, repo) = one_file_repo(work.path());
    let (kernel, modules) = fake_kernel(work.path());
    let out = work.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let victim = work.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    for name in ["initrd.img", "image.cpio", "initrd-combined.img", "vmlinuz", "boot.ipxe", "netboot.json"] {
        std::os::unix::fs::symlink(&victim, out.join(format!(".tmp-{name}"))).unwrap();
    }
    netboot(&repo.join("stable.json"), &keys.public, &kernel, &modules, &out, &[]);
    assert_eq!(read(&victim), b"precious", "netboot wrote through a planted symlink");
    assert!(fs::symlink_metadata(out.join("initrd.img")).unwrap().file_type().is_file());
}

/// A repository whose stable channel serves a one-file tree.
fn one_file_repo(dir: &Path) -> (Keys, PathBuf) {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("f"), b"x").unwrap();
    let keys = Keys::generate();
    let repo = dir.join("repo");
    build_image(&tree, &keys, "stable", &repo, &[]);
    (keys, repo)
}

/// A kernel and module directory good enough for `imgbuild netboot` to
/// package (loop, squashfs and overlay built in); nothing boots them.
fn fake_kernel(dir: &Path) -> (PathBuf, PathBuf) {
    let modules = dir.join("modules");
    fs::create_dir_all(&modules).unwrap();
    fs::write(modules.join("modules.dep"), "").unwrap();
    fs::write(
        modules.join("modules.builtin"),
        "kernel/drivers/block/loop.ko\nkernel/fs/squashfs/squashfs.ko\nkernel/fs/overlayfs/overlay.ko\n",
    )
    .unwrap();
    let kernel = dir.join("vmlinuz");
    fs::write(&kernel, b"kernel").unwrap();
    (kernel, modules)
}

#[test]
fn netboot_refuses_a_tampered_image_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("f"), vec![1u8; 50_000]).unwrap();
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    let b = build_image(&tree, &keys, "stable", &repo, &[]);
    let image = PathBuf::from(b["image"].as_str().unwrap());
    let mut bytes = fs::read(&image).unwrap();
    bytes[100] ^= 1;
    fs::write(&image, bytes).unwrap();
    let (kernel, modules) = fake_kernel(work.path());
    let out = work.path().join("out");
    netboot_run(&repo.join("stable.json"), &keys.public, &kernel, &modules, &out, &netboot_init(), &[])
        .fails_with("refusing to package it");
    let left: Vec<_> = fs::read_dir(&out).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!left.iter().any(|n| n == "image.cpio" || n == "initrd-combined.img"), "left {left:?}");
}

/// qemu arguments for a guest whose only network is user-mode networking
/// with `restrict=on`: it can reach nothing but 10.0.2.100:80, which carries
/// each connection to 127.0.0.1:`port` on the host.
fn guest_net(port: u16) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!("user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 {port}"),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]
}

fn boot_net(kernel: &Path, initrd: &Path, append: &str, port: u16) -> String {
    let net = guest_net(port);
    qemu::boot(kernel, initrd, append, &net.iter().map(String::as_str).collect::<Vec<_>>(), 150)
}

/// Network mode: one fixed set of boot files follows the channel. The
/// origin is nginx on the host, reached only through qemu's user network.
/// Whoever controls that origin (or the path to it) but not the key can stop
/// the boot, never change what boots: a tampered image and a manifest signed
/// by another key are refused attempt after attempt, then `onfail` applies.
#[test]
fn privileged_netboot_network_mode_boots_the_channels_current_image() {
    let Some((kernel, modules)) = prerequisites("privileged_netboot_network_mode_boots_the_channels_current_image")
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let web = work.path().join("web");
    let repo = web.join("repo");
    let keys = Keys::generate();
    build_image(&marker_tree(work.path(), "net-1"), &keys, "stable", &repo, &["--version", "net-1"]);
    let nginx = imgdeploy_tests::nginx::Nginx::serve(&web);
    let out = work.path().join("out");
    let r = netboot(
        &repo.join("stable.json"),
        &keys.public,
        &kernel,
        &modules,
        &out,
        &["--channel-url", "http://10.0.2.100/repo/stable.json"],
    );
    assert_eq!(r["policy"]["network"]["urls"][0], "http://10.0.2.100/repo/stable.json", "{r}");
    assert!(
        r["net_modules"].as_array().unwrap().iter().any(|m| m.as_str().unwrap().contains("virtio_net")),
        "no virtio_net driver: {r}"
    );
    assert!(!out.join("image.cpio").exists(), "network mode needs no image.cpio");
    let ipxe = fs::read_to_string(out.join("boot.ipxe")).unwrap();
    assert!(ipxe.contains("initrd initrd.img") && !ipxe.contains("image.cpio"), "{ipxe}");
    let (vmlinuz, initrd) = (out.join("vmlinuz"), out.join("initrd.img"));

    // Serial 1, from the URL the initrd was built with, over DHCP.
    let log = boot_net(&vmlinuz, &initrd, "imgdeploy.timeout=60", nginx.port);
    // (qemu's DHCP server offers no router under restrict=on; 10.0.2.100 is on the link.)
    assert!(log.lines().any(|l| l.trim_end() == "imgdeploy: network: eth0 10.0.2.15/24"), "{log}");
    assert!(log.contains("imgdeploy: verified channel stable serial 1 (net-1)"), "{log}");
    assert!(log.contains("IMGDEPLOY-MARKER version=net-1 write=ok"), "{log}");

    // Publish serial 2; the same files boot it. A first mirror that has
    // nothing is passed over; a static address from ip= works as well.
    build_image(&marker_tree(work.path(), "net-2"), &keys, "stable", &repo, &["--version", "net-2"]);
    let log = boot_net(
        &vmlinuz,
        &initrd,
        "imgdeploy.timeout=60 ip=10.0.2.77::10.0.2.2:255.255.255.0::eth0:off \
         imgdeploy.url=http://10.0.2.100/gone/stable.json imgdeploy.url=http://10.0.2.100/repo/stable.json",
        nginx.port,
    );
    assert!(log.contains("imgdeploy: network: eth0 10.0.2.77/24 via 10.0.2.2"), "{log}");
    assert!(log.contains("attempt 1: http://10.0.2.100/gone/stable.json") && log.contains("404"), "{log}");
    assert!(log.contains("IMGDEPLOY-MARKER version=net-2 write=ok"), "{log}");

    // The origin's image is tampered with: refused on every attempt, then onfail.
    let m: serde_json::Value = serde_json::from_slice(&read(&repo.join("stable.json"))).unwrap();
    let image = repo.join(m["image"]["path"].as_str().unwrap());
    let good = read(&image);
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    fs::write(&image, &bad).unwrap();
    let log = boot_net(&vmlinuz, &initrd, "imgdeploy.timeout=8", nginx.port);
    fs::write(&image, &good).unwrap();
    assert!(log.contains("attempt 1: http://10.0.2.100/repo/stable.json") && log.contains("sha256"), "{log}");
    assert!(log.contains("attempt 2:"), "no retry:\n{log}");
    assert!(log.contains("REFUSING TO BOOT: no verified image after"), "{log}");
    assert!(log.contains("imgdeploy: powering off"), "{log}");
    assert!(!log.contains("IMGDEPLOY-MARKER"), "a tampered image was booted:\n{log}");

    // A manifest signed by a key the initrd does not trust (same channel, higher serial).
    let theirs = Keys::generate();
    build_image(
        &marker_tree(work.path(), "evil"),
        &theirs,
        "stable",
        &web.join("evil"),
        &["--version", "evil", "--serial", "99"],
    );
    let log =
        boot_net(&vmlinuz, &initrd, "imgdeploy.timeout=5 imgdeploy.url=http://10.0.2.100/evil/stable.json", nginx.port);
    assert!(log.contains("does not verify with the keys this initrd trusts"), "{log}");
    assert!(!log.contains("IMGDEPLOY-MARKER"), "an image signed by another key was booted:\n{log}");

    // The origin is unreachable: a message per attempt, then onfail=reboot.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let log = boot_net(&vmlinuz, &initrd, "imgdeploy.timeout=10 imgdeploy.onfail=reboot", closed);
    assert!(log.contains("attempt 1: http://10.0.2.100/repo/stable.json"), "{log}");
    assert!(log.contains("attempt 3:"), "too few retries in 10 s:\n{log}");
    assert!(log.contains("REFUSING TO BOOT: no verified image after") && log.contains("imgdeploy: rebooting"), "{log}");
    assert!(started.elapsed() < std::time::Duration::from_secs(120), "onfail came too late");
    drop(nginx);
}

/// Network mode's options are checked when the initrd is built.
#[test]
fn netboot_network_mode_refuses_bad_options() {
    let work = tempfile::tempdir().unwrap();
    let (keys, repo) = one_file_repo(work.path());
    let (kernel, modules) = fake_kernel(work.path());
    let out = work.path().join("out");
    let m = repo.join("stable.json");
    let init = netboot_init();
    let refused = |extra: &[&str], needle: &str| {
        netboot_run(&m, &keys.public, &kernel, &modules, &out, &init, extra).fails_with(needle);
    };
    refused(&["--channel-url", "ftp://mirror/stable.json"], "is not an http:// or https:// URL");
    refused(&["--channel-url", "http://mirror/stable.json", "--net-modules", "no_such_nic"], "`no_such_nic`");
    let dynamic = bin("imgdeploy");
    refused(
        &["--channel-url", "http://mirror/stable.json", "--busybox", dynamic.to_str().unwrap()],
        "dynamically linked",
    );
    let r = run_bin(
        "imgbuild",
        ["netboot", "--pub", "k.pub", "--kernel", "k", "--modules", "m", "--out", "o", "--busybox", "/bin/busybox"],
    )
    .fails_with("required arguments were not provided");
    assert!(r.stderr.contains("--channel-url"), "{}", r.stderr);
    assert!(!out.join("initrd.img").exists());
    // Good options: the initrd carries busybox and the URL, nothing else changes.
    let r = netboot(&m, &keys.public, &kernel, &modules, &out, &["--channel-url", "http://mirror/stable.json"]);
    assert_eq!(r["policy"]["network"]["busybox"]["path"], "/bin/busybox", "{r}");
    assert!(!out.join("image.cpio").exists());
}
