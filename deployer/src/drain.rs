//! Finding the processes that still use a mount, and waiting for them to go.
//!
//! A process uses a mount when its working directory, root, executable, any
//! open file or any memory-mapped file lives on that filesystem. We compare
//! device numbers (the mount's `st_dev`) rather than path prefixes, so paths
//! reached through the `active` symlink, bind mounts or chroots are all seen.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A process holding a mount.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub command: String,
    /// How it holds the mount: cwd, root, exe, fd or mmap.
    pub how: &'static str,
}

/// The device number of the filesystem mounted at `mount_point`.
pub fn device_of(mount_point: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(mount_point)?.dev())
}

fn split_dev(dev: u64) -> (u64, u64) {
    (libc::major(dev) as u64, libc::minor(dev) as u64)
}

/// Whether a `/proc/PID/maps` text maps anything from device `dev`.
pub fn maps_use_device(maps: &str, dev: u64) -> bool {
    let (maj, min) = split_dev(dev);
    maps.lines().any(|l| {
        // address perms offset dev inode path ; dev is hex "major:minor"
        let Some(d) = l.split_whitespace().nth(3) else { return false };
        let Some((a, b)) = d.split_once(':') else { return false };
        matches!((u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)), (Ok(x), Ok(y)) if (x, y) == (maj, min))
    })
}

/// Every process (other than this one) using the filesystem with device `dev`.
pub fn holders(dev: u64) -> Vec<Holder> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return out };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let base = entry.path();
        // Processes come and go while we look; an unreadable entry is a process that exited.
        let on_dev = |p: &Path| fs::metadata(p).map(|m| m.dev() == dev).unwrap_or(false);
        let how = if on_dev(&base.join("cwd")) {
            Some("cwd")
        } else if on_dev(&base.join("root")) {
            Some("root")
        } else if on_dev(&base.join("exe")) {
            Some("exe")
        } else if fs::read_dir(base.join("fd")).map(|fds| fds.flatten().any(|fd| on_dev(&fd.path()))).unwrap_or(false) {
            Some("fd")
        } else if fs::read_to_string(base.join("maps")).map(|m| maps_use_device(&m, dev)).unwrap_or(false) {
            Some("mmap")
        } else {
            None
        };
        if let Some(how) = how {
            let command =
                fs::read_to_string(base.join("comm")).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "?".into());
            out.push(Holder { pid, command, how });
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

/// Waits up to `timeout` for the users of `dev` to go; returns those left.
pub fn wait_for_holders(dev: u64, timeout: Duration) -> Vec<Holder> {
    let deadline = Instant::now() + timeout;
    loop {
        let h = holders(dev);
        if h.is_empty() || Instant::now() >= deadline {
            return h;
        }
        std::thread::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// "pid 4121 (apache2, cwd), pid 4122 (sh, fd)".
pub fn describe(holders: &[Holder]) -> String {
    holders.iter().map(|h| format!("pid {} ({}, {})", h.pid, h.command, h.how)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_device_matching() {
        let dev = libc::makedev(7, 3);
        let maps =
            "7f00-7f01 r-xp 00000000 07:03 12 /var/lib/imgdeploy/mnt/a/lib/x.so\n7f01-7f02 rw-p 00000000 00:00 0\n";
        assert!(maps_use_device(maps, dev));
        assert!(!maps_use_device(maps, libc::makedev(7, 4)));
        assert!(!maps_use_device("", dev));
    }

    #[test]
    fn finds_a_process_by_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device_of(dir.path()).unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").current_dir(dir.path()).spawn().unwrap();
        let found = wait_for_holders(dev, Duration::from_millis(0));
        assert!(found.iter().any(|h| h.pid == child.id() && h.how == "cwd" && h.command == "sleep"), "{found:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
