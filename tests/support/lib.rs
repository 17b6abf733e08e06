//! Shared helpers of the end-to-end tests: locating the binaries, running
//! them, privileged-test gating, kernel loop mounts, tree snapshots for
//! comparing a mounted image with its source, and a real nginx.
//!
//! Privileged tests call [`require_root`]: on a developer laptop without root
//! they skip with a message; under `CI=true` a skip is a failure.

pub mod deploy;
pub mod docs;
pub mod faults;
pub mod nginx;
pub mod qemu;
pub mod snapshot;
pub mod trees;
pub mod writelog;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// True when the test may use root powers. Panics under `CI=true` when not root.
pub fn require_root(test: &str) -> bool {
    // SAFETY-free: geteuid has no preconditions; libc exposes it as unsafe.
    let root = nix_geteuid() == 0;
    if !root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs root, and CI=true forbids skipping");
        }
        eprintln!("SKIP {test}: needs root (runs for real in CI)");
    }
    root
}

fn nix_geteuid() -> u32 {
    // Read from /proc to stay free of unsafe code in the tests.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Path of a workspace binary (built by `cargo build` before the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-xxxx -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing; run `cargo build --workspace` first (the README's test command does)",
        p.display()
    );
    p
}

/// The statically linked `imgdeploy` that `imgbuild netboot` packs as
/// `/init`: `$IMGDEPLOY_NETBOOT_INIT` (the test script builds it first), or
/// built here once with `scripts/build-netboot-init.sh`.
pub fn netboot_init() -> PathBuf {
    static INIT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        if let Some(p) = std::env::var_os("IMGDEPLOY_NETBOOT_INIT") {
            return PathBuf::from(p);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-netboot-init.sh");
        let r = run(Command::new("bash").arg(script));
        assert_eq!(r.code, 0, "building the static netboot init failed:\n{}", r.stderr);
        PathBuf::from(r.stdout.trim())
    })
    .clone()
}

/// Every file below `dir` (recursively), in no particular order.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A finished command.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panics unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    /// Panics unless the command failed with a non-zero exit and an `error:`
    /// line on stderr containing `needle`.
    #[track_caller]
    pub fn fails_with(self, needle: &str) -> Self {
        assert_ne!(self.code, 0, "command unexpectedly succeeded\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no `error:` line in stderr: {}", self.stderr));
        assert!(line.contains(needle), "error line {line:?} does not contain {needle:?}\nfull stderr: {}", self.stderr);
        self
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs a command to completion (no stdin).
pub fn run(cmd: &mut Command) -> Run {
    cmd.stdin(std::process::Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}")).into()
}

/// Runs one of our binaries with `args`.
pub fn run_bin<I, S>(name: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(bin(name)).args(args))
}

/// Runs `sh -c script`, panicking on failure.
#[track_caller]
pub fn sh(script: &str) -> String {
    let r = run(Command::new("sh").arg("-c").arg(script));
    assert_eq!(r.code, 0, "`{script}` failed: {}", r.stderr);
    r.stdout
}

/// The uid and gid of the unprivileged reader (`nobody`): a web server
/// such as Apache reads the deployed tree as `www-data`, never as root, so
/// every test that reads through `link` reads as this user.
pub const READER_UID: u32 = 65534;

/// `setpriv` arguments that run a command as [`READER_UID`] with no
/// supplementary groups and no capabilities.
pub fn as_reader() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={READER_UID}"),
        format!("--regid={READER_UID}"),
        "--clear-groups".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ]);
    c
}

/// Reads `path` as the unprivileged reader; the error is `cat`'s message
/// (e.g. "Permission denied").
pub fn read_as_reader(path: &Path) -> Result<String, String> {
    let r = run(as_reader().arg("cat").arg(path));
    if r.code == 0 {
        Ok(r.stdout)
    } else {
        Err(r.stderr.trim().to_owned())
    }
}

/// A temp directory every user may traverse (mode 0755; `tempfile` makes
/// 0700 ones), so that the unprivileged reader can reach a link inside it.
pub fn readable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// `len` incompressible, deterministic bytes for `seed` (xorshift64).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A read-only loop mount that is unmounted when dropped.
pub struct LoopMount {
    /// The mount point.
    pub dir: tempfile::TempDir,
}

impl LoopMount {
    /// Mounts the squashfs `image` read-only with the kernel.
    pub fn new(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let r = run(Command::new("mount").args(["-t", "squashfs", "-o", "loop,ro"]).arg(image).arg(dir.path()));
        assert_eq!(r.code, 0, "kernel refused to mount {}: {}", image.display(), r.stderr);
        LoopMount { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        for _ in 0..50 {
            if run(Command::new("umount").arg(self.dir.path())).code == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("warning: could not unmount {}", self.dir.path().display());
    }
}

/// A signing key pair generated for one test.
pub struct Keys {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// PREFIX.key
    pub key: PathBuf,
    /// PREFIX.pub
    pub public: PathBuf,
}

impl Keys {
    /// Generates a fresh key pair with `imgbuild keygen`.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("test");
        run_bin("imgbuild", [OsStr::new("keygen"), OsStr::new("--out"), prefix.as_os_str()]).ok();
        Keys { key: dir.path().join("test.key"), public: dir.path().join("test.pub"), dir }
    }
}

/// `imgbuild build SRC --key K --channel C --repo R --json [extra...]`, returning the JSON.
pub fn build_image(src: &Path, keys: &Keys, channel: &str, repo: &Path, extra: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(bin("imgbuild"));
    cmd.arg("build")
        .arg(src)
        .arg("--key")
        .arg(&keys.key)
        .args(["--channel", channel])
        .arg("--repo")
        .arg(repo)
        .arg("--json")
        .args(extra);
    run(&mut cmd).ok().json()
}
