//! PXE/ramdisk variant (issue 6): build netboot artifacts for a tiny image
//! whose /sbin/init is a static busybox script, boot them in qemu (TCG), and
//! check the marker; a flipped byte in the image must stop the boot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use imgdeploy_tests::qemu::{self, prerequisites};
use imgdeploy_tests::{build_image, run, run_bin, Keys};

fn boot(kernel: &Path, initrd: &Path, append: &str) -> String {
    qemu::boot(kernel, initrd, append, &[], 90)
}

#[test]
fn privileged_netboot_boots_the_signed_image_in_qemu() {
    let Some((kernel, modules)) = prerequisites("privileged_netboot_boots_the_signed_image_in_qemu") else { return };
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
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
    fs::write(tree.join("etc/image-version"), "nb-42").unwrap();
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    build_image(&tree, &keys, "stable", &repo, &["--version", "nb-42"]);
    let out = work.path().join("out");
    let manifest = repo.join("stable.json");
    let r = run_bin(
        "imgbuild",
        [
            "netboot",
            "--manifest",
            manifest.to_str().unwrap(),
            "--pub",
            keys.public.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--modules",
            modules.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .ok()
    .json();
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
    let mut cpio = fs::read(out.join("image.cpio")).unwrap();
    let at = cpio.windows(4).position(|w| w == b"hsqs").expect("image inside image.cpio") + 3000;
    cpio[at] ^= 0x01;
    let tampered = work.path().join("tampered.img");
    fs::write(&tampered, [cpio, fs::read(out.join("initrd.img")).unwrap()].concat()).unwrap();
    let log = boot(&out.join("vmlinuz"), &tampered, "");
    assert!(log.contains("imgdeploy: REFUSING TO BOOT") && log.contains("sha256"), "{log}");
    assert!(!log.contains("IMGDEPLOY-MARKER"), "a tampered image was booted:\n{log}");
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
    let modules = work.path().join("modules");
    fs::create_dir_all(&modules).unwrap();
    fs::write(modules.join("modules.dep"), "").unwrap();
    fs::write(
        modules.join("modules.builtin"),
        "kernel/drivers/block/loop.ko\nkernel/fs/squashfs/squashfs.ko\nkernel/fs/overlayfs/overlay.ko\n",
    )
    .unwrap();
    let kernel = work.path().join("vmlinuz");
    fs::write(&kernel, b"kernel").unwrap();
    let out = work.path().join("out");
    run_bin(
        "imgbuild",
        [
            "netboot",
            "--manifest",
            repo.join("stable.json").to_str().unwrap(),
            "--pub",
            keys.public.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--modules",
            modules.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .fails_with("refusing to package it");
    let left: Vec<_> = fs::read_dir(&out).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!left.iter().any(|n| n == "image.cpio" || n == "initrd-combined.img"), "left {left:?}");
}
