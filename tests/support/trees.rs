//! Source trees for the tests: a fixed tree holding every entry type an OS
//! root or CGI chroot holds, and random trees for property tests. Building
//! devices, owners and trusted./security. xattrs needs root.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sh;

fn set_mtime(path: &Path, secs: i64) {
    let p = path.as_os_str().as_bytes();
    let mut quoted = Vec::new();
    quoted.extend_from_slice(b"'");
    for &b in p {
        if b == b'\'' {
            quoted.extend_from_slice(b"'\\''");
        } else {
            quoted.push(b);
        }
    }
    quoted.extend_from_slice(b"'");
    let script = [b"touch -h -d @".as_slice(), secs.to_string().as_bytes(), b" ", &quoted].concat();
    let r = crate::run(std::process::Command::new("sh").arg("-c").arg(OsStr::from_bytes(&script)));
    assert_eq!(r.code, 0, "touch failed: {}", r.stderr);
}

/// Builds the fixed tree at `root` (created). Needs root.
pub fn every_entry_type(root: &Path) {
    let r = root;
    fs::create_dir_all(r.join("empty")).unwrap();
    fs::create_dir_all(r.join("etc/sub")).unwrap();
    fs::write(r.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(r.join("big"), (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>())
        .unwrap();
    fs::write(r.join("zeros"), vec![0u8; 400_000]).unwrap();
    fs::write(r.join("empty-file"), b"").unwrap();
    // Sparse: 20 MiB with two small islands of data.
    sh(&format!(
        "truncate -s 20M '{0}/sparse' && printf data | dd of='{0}/sparse' bs=1 seek=7000000 conv=notrunc 2>/dev/null && printf end | dd of='{0}/sparse' bs=1 seek=20971517 conv=notrunc 2>/dev/null",
        r.display()
    ));
    fs::write(r.join("suid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(r.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(r.join("etc/sub"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::set_permissions(r.join("empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(r.join("private"), b"s").unwrap();
    fs::set_permissions(r.join("private"), fs::Permissions::from_mode(0o000)).unwrap();
    // Hardlinks: three names, one inode, across directories.
    fs::hard_link(r.join("etc/passwd"), r.join("etc/sub/passwd-link")).unwrap();
    fs::hard_link(r.join("etc/passwd"), r.join("passwd-root-link")).unwrap();
    symlink("etc/passwd", r.join("rel-link")).unwrap();
    symlink("/etc/passwd", r.join("abs-link")).unwrap();
    symlink("does/not/exist", r.join("dangling")).unwrap();
    symlink("t".repeat(3000), r.join("long-link")).unwrap();
    // A hardlinked symlink.
    fs::hard_link(r.join("rel-link"), r.join("etc/rel-link-2")).unwrap();
    sh(&format!(
        "cd '{0}' && mknod cdev c 300 70000 && mknod null c 1 3 && mknod bdev b 8 1 && mknod bigdev b 4095 1048575 && mkfifo fifo && \
         python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.bind('sock')\" && \
         chown 65534:5678 etc/sub && chown 5678:65534 etc/passwd && chown -h 1234:4321 rel-link && \
         setfattr -n user.mime -v text/plain etc/passwd && setfattr -n user.empty etc/passwd && \
         setfattr -n trusted.overlay.opaque -v y etc && \
         setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= suid && \
         setfattr -h -n trusted.on-symlink -v 1 rel-link",
        r.display()
    ));
    // Awkward names.
    for name in [&b"with space"[..], b"new\nline", b"bad\xff\xfeutf8", b"-dash", b"*glob?", b"tab\tname"] {
        fs::write(r.join(OsStr::from_bytes(name)), name).unwrap();
    }
    fs::write(r.join("n".repeat(255)), b"long name").unwrap();
    // 100-deep nesting.
    let mut deep = r.join("deep");
    for i in 0..100 {
        deep = deep.join(format!("{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"bottom").unwrap();
    // Directory with many entries (several directory headers and an index).
    fs::create_dir(r.join("many")).unwrap();
    for i in 0..3000 {
        fs::write(r.join(format!("many/file-{i:05}")), format!("{i}")).unwrap();
    }
    for (p, t) in
        [("etc/passwd", 86400i64), ("rel-link", 1_000_000_000), ("etc", 2_000_000_000), ("deep/0", 4_000_000_000)]
    {
        set_mtime(&r.join(p), t);
    }
}

/// One entry of a random tree.
#[derive(Debug, Clone)]
pub enum Spec {
    /// A file of `len` bytes generated from `seed`.
    File { len: usize, seed: u8 },
    /// A directory.
    Dir,
    /// A symlink.
    Symlink(Vec<u8>),
    /// A hardlink to the n-th file created so far (modulo their count).
    Hardlink(usize),
    /// A fifo.
    Fifo,
    /// A char device.
    CharDev(u32, u32),
}

/// One random entry: which directory (modulo the directories so far), its name, what it is, metadata.
#[derive(Debug, Clone)]
pub struct RandomEntry {
    /// Parent directory choice.
    pub dir: usize,
    /// Name bytes (no '/', no NUL).
    pub name: Vec<u8>,
    /// What it is.
    pub spec: Spec,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime.
    pub mtime: u32,
    /// An optional user xattr value.
    pub xattr: Option<Vec<u8>>,
}

fn mknod(dir: &Path, name: &[u8], args: &[&str]) {
    let r = crate::run(std::process::Command::new("mknod").current_dir(dir).arg(OsStr::from_bytes(name)).args(args));
    assert_eq!(r.code, 0, "mknod failed: {}", r.stderr);
}

/// Materialises random entries under `root` (created). Needs root for owners and devices.
pub fn random_tree(root: &Path, entries: &[RandomEntry]) {
    fs::create_dir_all(root).unwrap();
    let mut dirs: Vec<PathBuf> = vec![root.to_owned()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut chowns = Vec::new();
    for e in entries {
        let parent = dirs[e.dir % dirs.len()].clone();
        let path = parent.join(OsStr::from_bytes(&e.name));
        if path.symlink_metadata().is_ok() {
            continue;
        }
        match &e.spec {
            Spec::File { len, seed } => {
                let data: Vec<u8> = (0..*len).map(|i| (i as u8).wrapping_mul(*seed) ^ (i >> 9) as u8).collect();
                fs::write(&path, data).unwrap();
                files.push(path.clone());
            }
            Spec::Dir => {
                fs::create_dir(&path).unwrap();
                dirs.push(path.clone());
            }
            Spec::Symlink(t) => symlink(OsStr::from_bytes(t), &path).unwrap(),
            Spec::Hardlink(n) => {
                if files.is_empty() {
                    continue;
                }
                fs::hard_link(&files[n % files.len()], &path).unwrap();
                continue; // shares the target's metadata
            }
            // Made in the parent directory so only the (plain ASCII) name meets the shell.
            Spec::Fifo => mknod(&parent, &e.name, &["p"]),
            Spec::CharDev(maj, min) => mknod(&parent, &e.name, &["c", &maj.to_string(), &min.to_string()]),
        }
        if !matches!(e.spec, Spec::Symlink(_)) {
            fs::set_permissions(&path, fs::Permissions::from_mode(e.mode & 0o7777)).unwrap();
        }
        // The kernel allows user.* xattrs only on regular files and directories.
        if let (Some(v), Spec::File { .. } | Spec::Dir) = (&e.xattr, &e.spec) {
            xattr::set(&path, "user.random", v).unwrap();
        }
        chowns.push((path, e.uid, e.gid, e.mtime));
    }
    // Owners and times last, deepest first, so creating children does not bump a parent's mtime.
    for (path, uid, gid, mtime) in chowns.iter().rev() {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let r = std::process::Command::new("chown")
            .arg("-h")
            .arg(format!("{uid}:{gid}"))
            .arg(OsStr::from_bytes(c.as_bytes()))
            .status()
            .unwrap();
        assert!(r.success());
        set_mtime(path, *mtime as i64);
    }
}
