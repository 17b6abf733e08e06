//! The field test: a real Debian frontend under qemu, driven as an operator
//! would drive one. The root filesystem comes from `mmdebstrap` (bookworm,
//! systemd, Apache with mod_cgid); the `imgdeploy` and `imgbuild` packages
//! built by `scripts/package-deb.sh` are installed into it with apt. The
//! origin is nginx on the host's 127.0.0.1, which the guest reaches only
//! through qemu's restricted user network and one `guestfwd`.
//!
//! Inside, `tests/vm/frontend-driver.sh` (a systemd unit at every boot)
//! applies v1, switches to v2 while a client loop requests a CGI and a
//! static file from Apache (as `www-data`), has a tampered publish refused
//! and rolls back, reboots (the mount unit restores the link before Apache
//! starts, the timer runs apply), corrupts the active image and reboots
//! again (the host serves the other verified version). The host answers its
//! `WANT` lines by publishing and checks every `CHECK` line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::qemu::prerequisites;
use imgdeploy_tests::{run, sh};

const DRIVER: &str = include_str!("../vm/frontend-driver.sh");
/// Kernel modules the guest loads (with their dependencies): the root
/// filesystem has no kernel package of its own, the host's kernel boots it.
const GUEST_MODULES: &[&str] = &["loop", "squashfs", "overlay", "virtio_net", "dm-verity"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The two packages, built by the script the README names.
fn packages() -> Vec<PathBuf> {
    let r = run(Command::new("bash").arg(workspace().join("scripts/package-deb.sh")));
    assert_eq!(r.code, 0, "scripts/package-deb.sh failed: {}", r.stderr);
    let debs: Vec<PathBuf> = r.stdout.lines().map(|l| workspace().join(l.trim())).collect();
    for name in ["imgdeploy_", "imgbuild_"] {
        assert!(debs.iter().any(|d| d.file_name().unwrap().to_string_lossy().starts_with(name)), "{debs:?}");
    }
    debs
}

/// A version of the served tree: a static file and a CGI that reads two
/// files of its own tree, so a response mixing versions would show.
fn tree(dir: &Path, label: &str) {
    fs::create_dir_all(dir.join("htdocs")).unwrap();
    fs::create_dir_all(dir.join("cgi-bin")).unwrap();
    fs::write(dir.join("version"), label).unwrap();
    fs::write(dir.join("htdocs/version.txt"), label).unwrap();
    // Incompressible, so stored as is: the guest finds its bytes in the
    // image by the marker and corrupts one of them (the dm-verity check).
    let mut blob = b"FIELDTEST-BLOB-MARKER".to_vec();
    // Its own bytes in every version: the tampered publish must have to
    // download its damaged chunk (no version can supply it locally).
    blob.extend(imgdeploy_tests::noise(256 << 10, label.bytes().fold(7, |a: u64, b| a.wrapping_mul(31) ^ b as u64)));
    fs::write(dir.join("htdocs/blob.bin"), blob).unwrap();
    let cgi = dir.join("cgi-bin/version.cgi");
    fs::write(
        &cgi,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\n\\n'\necho \"$(cat ../version) $(cat ../htdocs/version.txt) $(id -un)\"\n",
    )
    .unwrap();
    sh(&format!("chmod 755 '{}'", cgi.display()));
}

/// Writes the guest's own files into the unpacked root `root`.
fn configure_guest(root: &Path, pubkey: &Path) {
    let w = |p: &str, text: &str| {
        let p = root.join(p.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    };
    w(
        "/etc/imgdeploy/imgdeploy.toml",
        "source = \"http://10.0.2.100/stable.json\"\ntrusted_keys = [\"/etc/imgdeploy/keys/ci.pub\"]\n\
         link = \"/webroot/cgi\"\ndrain_timeout = \"5s\"\nmetrics_file = \"/var/lib/prometheus/imgdeploy.prom\"\n",
    );
    fs::create_dir_all(root.join("var/lib/prometheus")).unwrap();
    fs::copy(pubkey, root.join("etc/imgdeploy/keys/ci.pub")).unwrap();
    w(
        "/etc/apache2/sites-available/000-default.conf",
        "<VirtualHost *:80>\n  DocumentRoot /webroot/cgi/htdocs\n  ScriptAlias /cgi-bin/ /webroot/cgi/cgi-bin/\n\
         <Directory /webroot/cgi/>\n    Options +FollowSymLinks\n    Require all granted\n  </Directory>\n</VirtualHost>\n",
    );
    w(
        "/etc/systemd/network/10-qemu.network",
        "[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n",
    );
    // The operator's timer, made to fire soon after boot for the test.
    w(
        "/etc/systemd/system/imgdeploy-apply.timer.d/soon.conf",
        "[Timer]\nOnBootSec=\nOnBootSec=20s\nRandomizedDelaySec=0\n",
    );
    w("/usr/local/sbin/fieldtest", DRIVER);
    sh(&format!("chmod 755 '{}'", root.join("usr/local/sbin/fieldtest").display()));
    w(
        "/etc/systemd/system/fieldtest.service",
        "[Unit]\nDescription=imgdeploy field test driver\nAfter=multi-user.target apache2.service\n\n\
         [Service]\nType=simple\nExecStart=/usr/local/sbin/fieldtest\n\n[Install]\nWantedBy=multi-user.target\n",
    );
    fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants")).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/fieldtest.service",
        root.join("etc/systemd/system/multi-user.target.wants/fieldtest.service"),
    )
    .unwrap();
}

/// Copies the modules the guest needs (and their dependencies) from the
/// host's kernel package into the guest root and indexes them.
fn install_modules(root: &Path, modules: &Path) {
    let ver = modules.file_name().unwrap();
    let dst = root.join("lib/modules").join(ver);
    for m in imgdeploy_builder::netboot::resolve_modules(modules, GUEST_MODULES).unwrap() {
        let to = dst.join(&m);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(modules.join(&m), to).unwrap();
    }
    for f in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
        fs::copy(modules.join(f), dst.join(f)).unwrap();
    }
    sh(&format!("depmod -b '{}' '{}'", root.display(), ver.to_string_lossy()));
}

/// Kills qemu if the test fails halfway.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        // Best effort: it may have powered off already.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn privileged_debian_frontend_vm() {
    let Some((kernel, modules)) = prerequisites("privileged_debian_frontend_vm") else { return };
    let started = Instant::now();
    let ver = modules.file_name().unwrap().to_string_lossy().into_owned();
    let initrd = PathBuf::from(format!("/boot/initrd.img-{ver}"));
    assert!(initrd.exists(), "{} is missing (linux-image-amd64 makes it with initramfs-tools)", initrd.display());
    let debs = packages();

    let d = Deployment::new("", "");
    let work = d.dir.path();
    let root = work.join("guest-root");
    // Everything the guest installs comes from Debian's archive through apt,
    // the two packages from this build included.
    let debs_in_guest: Vec<String> =
        debs.iter().map(|p| format!("/tmp/debs/{}", p.file_name().unwrap().to_string_lossy())).collect();
    let mut mm = Command::new("mmdebstrap");
    mm.args(["--variant=minbase", "--include=systemd-sysv,udev,apache2,curl", "--quiet"])
        .arg("--customize-hook=mkdir -p \"$1/tmp/debs\"");
    for p in &debs {
        mm.arg(format!("--customize-hook=copy-in {} /tmp/debs/", p.display()));
    }
    mm.arg(format!(
        "--customize-hook=chroot \"$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q {}",
        debs_in_guest.join(" ")
    ))
    .arg("--customize-hook=chroot \"$1\" a2enmod -q cgid")
    .arg("--customize-hook=chroot \"$1\" systemctl enable systemd-networkd")
    .args(["bookworm"])
    .arg(&root);
    let r = run(&mut mm);
    assert_eq!(r.code, 0, "mmdebstrap failed: {}\n{}", r.stderr, r.stdout);
    configure_guest(&root, &d.keys.public);
    install_modules(&root, &modules);
    let disk = work.join("root.img");
    sh(&format!("mke2fs -q -t ext4 -d '{}' '{}' 1536M", root.display(), disk.display()));
    fs::remove_dir_all(&root).unwrap();
    let built = started.elapsed();

    // The origin: what the guest asks for, by name.
    let publish = |label: &str| {
        let t = work.join(format!("tree-{label}"));
        tree(&t, label);
        let out = d.publish_tree(&t, label);
        if label == "bad" {
            // Someone with the bucket but not the key: the bytes of the image
            // and of every static delta to it change.
            let m =
                imgdeploy_common::manifest::Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
            let image = PathBuf::from(out["image"].as_str().unwrap());
            for file in std::iter::once(image).chain(m.deltas.iter().map(|x| d.repo.join(&x.path))) {
                let mut b = fs::read(&file).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0xff;
                fs::write(&file, b).unwrap();
            }
        }
        fs::write(d.repo.join(format!("ready-{label}")), "").unwrap();
    };
    let console = work.join("console.log");
    let driver = work.join("driver.log");
    let vm = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nographic", "-nodefaults"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=0"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-netdev")
        .arg(format!("user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 {}", d.nginx.port))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", driver.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut vm = Vm(vm);
    let booted = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(420);
    let read_lines = || -> Vec<String> {
        let text = fs::read_to_string(&driver).unwrap_or_default();
        text.lines().map(|l| l.trim_end_matches('\r').to_owned()).collect()
    };
    // Each line with the host's time since qemu started, for the report.
    let mut timed: Vec<String> = Vec::new();
    let mut answered = 0;
    let lines = loop {
        let lines = read_lines();
        for l in &lines[timed.len().min(lines.len())..] {
            timed.push(format!("[{:5.1} s] {l}", booted.elapsed().as_secs_f64()));
        }
        let wants: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("WANT ")).collect();
        for w in &wants[answered..] {
            publish(w);
        }
        answered = wants.len();
        if let Some(status) = vm.0.try_wait().unwrap() {
            // Powered off: the last lines are in the file.
            eprintln!("qemu exited with {status}");
            break read_lines();
        }
        if Instant::now() > deadline {
            let tail: Vec<String> =
                fs::read_to_string(&console).unwrap_or_default().lines().rev().take(60).map(str::to_owned).collect();
            panic!(
                "the guest did not finish within 420 s\ndriver:\n{}\nconsole (last lines, newest first):\n{}",
                timed.join("\n"),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let ran = booted.elapsed();
    eprintln!("{}", timed.join("\n"));
    eprintln!(
        "field test: packages and root filesystem ready in {:.0} s, three boots and all checks in {:.0} s",
        built.as_secs_f64(),
        ran.as_secs_f64()
    );
    let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("CHECK ") && !l.ends_with(" ok")).collect();
    let passed = lines.iter().filter(|l| l.starts_with("CHECK ") && l.ends_with(" ok")).count();
    assert!(
        failed.is_empty(),
        "checks failed in the guest:\n{}",
        failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert!(lines.iter().any(|l| l.starts_with("DONE")), "the driver did not finish; console: {}", console.display());
    // Every phase ran every check (a phase cut short would pass silently otherwise).
    let expected = DRIVER
        .lines()
        .filter(|l| {
            l.starts_with("  check ")
                || l.starts_with("  expect ")
                || (l.starts_with("  ") && (l.contains("then ok ") || l.contains("else ok ")))
        })
        .count();
    assert_eq!(passed, expected, "not every check of every phase reported");
    // The guest fetched only from the origin it was given.
    assert!(d.nginx.log().iter().any(|l| l.starts_with("GET /images/")), "{:?}", d.nginx.log());
    drop(vm);
    eprintln!("field test: {passed} checks passed");
}
