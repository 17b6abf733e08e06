//! Booting a Debian kernel in qemu (TCG) for the tests that need a whole
//! machine: netboot, and power loss (a guest whose disk writes qemu logs).
//!
//! [`Initramfs`] packs a guest's root filesystem as a newc cpio with the
//! builder's own writer: files at chosen paths, binaries with the shared
//! libraries `ldd` lists, and kernel modules with their dependencies.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use imgdeploy_builder::cpio::CpioWriter;
use imgdeploy_builder::netboot::{resolve_modules, shared_libraries};

use crate::{require_root, run};

/// The Debian kernel and its modules (package linux-image-amd64), if installed.
pub fn debian_kernel() -> Option<(PathBuf, PathBuf)> {
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    kernels.sort();
    kernels.into_iter().rev().find_map(|k| {
        let ver = k.file_name()?.to_string_lossy().trim_start_matches("vmlinuz-").to_owned();
        let m = PathBuf::from("/lib/modules").join(&ver);
        m.join("modules.dep").exists().then_some((k, m))
    })
}

/// Root (CI) plus the Debian kernel, qemu and busybox-static that the test
/// script installs: `(kernel, modules dir)`, or `None` to skip (never under `CI=true`).
pub fn prerequisites(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !require_root(test) {
        return None;
    }
    let found = debian_kernel().filter(|_| {
        Path::new("/bin/busybox").exists()
            && run(Command::new("sh").arg("-c").arg("command -v qemu-system-x86_64")).code == 0
    });
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{test}: linux-image-amd64, qemu-system-x86 and busybox-static must be installed in CI"
        );
        eprintln!("SKIP {test}: needs linux-image-amd64, qemu-system-x86 and busybox-static");
    }
    found
}

/// Boots `kernel` with `initrd` under TCG (`-enable-kvm` hangs on these
/// machines), 512 MiB, serial console on stdout, plus `extra` qemu
/// arguments; returns the console output. The guest must power off within
/// `timeout_s` seconds.
pub fn boot(kernel: &Path, initrd: &Path, append: &str, extra: &[&str], timeout_s: u32) -> String {
    let out = run(Command::new("timeout")
        .arg(timeout_s.to_string())
        .args(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {append}"))
        .args(extra));
    assert_ne!(out.code, 124, "qemu did not power off within {timeout_s} s:\n{}", out.stdout);
    assert_eq!(out.code, 0, "qemu failed: {}\n{}", out.stderr, out.stdout);
    out.stdout
}

/// A guest root filesystem being packed into a newc cpio.
pub struct Initramfs {
    w: CpioWriter<BufWriter<File>>,
    files: BTreeSet<String>,
}

fn rel(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_owned()
}

impl Initramfs {
    /// Starts `path`, with `/dev/console` (the kernel opens it for `/init`).
    pub fn create(path: &Path) -> Self {
        let w = CpioWriter::new(BufWriter::new(File::create(path).unwrap()));
        let mut me = Initramfs { w, files: BTreeSet::new() };
        me.dir("dev");
        me.w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        me
    }

    /// A directory and its parents (relative or absolute guest path).
    pub fn dir(&mut self, path: &str) {
        self.w.dir_all(path).unwrap();
    }

    /// `bytes` at guest path `name`.
    pub fn bytes(&mut self, name: &str, perm: u32, bytes: &[u8]) {
        let name = name.trim_start_matches('/').to_owned();
        self.w.parent_dirs(&name).unwrap();
        if self.files.insert(name.clone()) {
            self.w.file(&name, perm, bytes.len() as u64, bytes).unwrap();
        }
    }

    /// The host file `src` at guest path `name` (each path once).
    pub fn file(&mut self, name: &str, src: &Path) {
        let md = fs::metadata(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let name = name.trim_start_matches('/').to_owned();
        self.w.parent_dirs(&name).unwrap();
        if self.files.insert(name.clone()) {
            use std::os::unix::fs::PermissionsExt;
            let f = File::open(src).unwrap();
            self.w.file(&name, md.permissions().mode() & 0o7777, md.len(), f).unwrap();
        }
    }

    /// The host file or directory tree `src` at the same path in the guest.
    pub fn mirror(&mut self, src: &Path) {
        if src.is_dir() {
            self.dir(&rel(src));
            let mut entries: Vec<_> = fs::read_dir(src).unwrap().flatten().map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                self.mirror(&e);
            }
        } else {
            self.file(&rel(src), src);
        }
    }

    /// A dynamically linked host binary at guest path `name`, with its libraries at their host paths.
    pub fn binary(&mut self, name: &str, src: &Path) {
        self.file(name, src);
        for lib in shared_libraries(src).unwrap() {
            let real = fs::canonicalize(&lib).unwrap();
            self.file(&rel(&lib), &real);
        }
    }

    /// Kernel modules `wanted` and their dependencies under `lib/modules/`,
    /// with their load order in `lib/modules/order` (one guest path a line).
    pub fn modules(&mut self, modules_dir: &Path, wanted: &[&str]) -> Vec<String> {
        let order = resolve_modules(modules_dir, wanted).unwrap();
        let mut list = String::new();
        for m in &order {
            let name = format!("lib/modules/{m}");
            self.file(&name, &modules_dir.join(m));
            list.push('/');
            list.push_str(&name);
            list.push('\n');
        }
        self.bytes("lib/modules/order", 0o644, list.as_bytes());
        order
    }

    /// Ends the archive.
    pub fn finish(self) {
        self.w.finish().unwrap().flush().unwrap();
    }
}
