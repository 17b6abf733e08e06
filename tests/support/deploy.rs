//! A complete deployment under a temp directory for one test: keys, a
//! repository served by a real nginx, a config, a state dir and a link.
//! Dropping it unmounts whatever the test left mounted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::nginx::Nginx;
use crate::{bin, build_image, run, Keys, Run};

/// One frontend and its repository.
pub struct Deployment {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// Signing keys.
    pub keys: Keys,
    /// Repository served by nginx.
    pub repo: PathBuf,
    /// The server.
    pub nginx: Nginx,
    /// imgdeploy.toml
    pub config: PathBuf,
    /// state_dir
    pub state: PathBuf,
    /// The active link.
    pub link: PathBuf,
    /// A filesystem of its own mounted at `state` ([`Self::on_filesystem`]).
    state_fs: bool,
}

impl Deployment {
    /// A deployment with `extra` appended to the config and `nginx_extra` in nginx's server block.
    pub fn new(extra: &str, nginx_extra: &str) -> Self {
        let dir = crate::readable_tempdir();
        let keys = Keys::generate();
        let repo = dir.path().join("repo");
        fs::create_dir_all(&repo).unwrap();
        let nginx = Nginx::serve_with(&repo, nginx_extra);
        let state = dir.path().join("state");
        let link = dir.path().join("webroot/cgi");
        let config = dir.path().join("imgdeploy.toml");
        let d = Deployment { dir, keys, repo, nginx, config, state, link, state_fs: false };
        d.write_config(extra);
        d
    }

    /// A deployment whose state directory is a fresh `fs` (`xfs` or
    /// `btrfs`, which can share extents between files) on a loop device:
    /// a sparse 1 GiB file in the temp directory, unmounted on drop.
    pub fn on_filesystem(fs: &str) -> Self {
        let mut d = Self::new("", "");
        let backing = d.dir.path().join(format!("{fs}.img"));
        fs::File::create(&backing).unwrap().set_len(1 << 30).unwrap();
        let mkfs = match fs {
            "xfs" => run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&backing)),
            _ => run(Command::new(format!("mkfs.{fs}")).arg("-q").arg(&backing)),
        };
        assert_eq!(mkfs.code, 0, "mkfs.{fs}: {}", mkfs.stderr);
        fs::create_dir_all(&d.state).unwrap();
        run(Command::new("mount").arg("-o").arg("loop").arg(&backing).arg(&d.state)).ok();
        d.state_fs = true;
        d
    }

    /// Rewrites the config with `extra` lines.
    pub fn write_config(&self, extra: &str) {
        fs::write(
            &self.config,
            format!(
                "source = \"{}\"\ntrusted_keys = [\"{}\"]\nstate_dir = \"{}\"\nlink = \"{}\"\n{}{extra}\n",
                self.nginx.url("stable.json"),
                self.keys.public.display(),
                self.state.display(),
                self.link.display(),
                if extra.contains("drain_timeout") { "" } else { "drain_timeout = \"1s\"\n" },
            ),
        )
        .unwrap();
    }

    /// Builds a tree whose `version` file says `label` (plus `padding` bytes of
    /// incompressible data) and publishes it to `channel`. Returns imgbuild's JSON.
    pub fn publish_to(&self, channel: &str, label: &str, padding: usize, extra: &[&str]) -> serde_json::Value {
        let tree = self.dir.path().join(format!("tree-{channel}-{label}"));
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::write(tree.join("version"), label).unwrap();
        fs::write(tree.join("bin/app.cgi"), format!("#!/bin/sh\necho {label}\n")).unwrap();
        let seed = label.bytes().fold(0, |a: u64, b| a.rotate_left(5) ^ b as u64);
        fs::write(tree.join("padding"), crate::noise(padding, seed)).unwrap();
        let mut args = vec!["--version", label];
        args.extend_from_slice(extra);
        build_image(&tree, &self.keys, channel, &self.repo, &args)
    }

    /// Publishes the tree at `tree` to `stable` with version `label` (also
    /// written to the tree's `version` file, which [`Self::active_version`] reads).
    pub fn publish_tree(&self, tree: &Path, label: &str) -> serde_json::Value {
        fs::write(tree.join("version"), label).unwrap();
        build_image(tree, &self.keys, "stable", &self.repo, &["--version", label, "--level", "3"])
    }

    /// [`Self::publish_tree`] with more `imgbuild build` arguments.
    pub fn publish_tree_with(&self, tree: &Path, label: &str, extra: &[&str]) -> serde_json::Value {
        fs::write(tree.join("version"), label).unwrap();
        let mut args = vec!["--version", label, "--level", "3"];
        args.extend_from_slice(extra);
        build_image(tree, &self.keys, "stable", &self.repo, &args)
    }

    /// Publishes `label` to the `stable` channel.
    pub fn publish(&self, label: &str) -> serde_json::Value {
        self.publish_to("stable", label, 0, &[])
    }

    /// Runs `imgdeploy -c CONFIG args...`.
    pub fn imgdeploy(&self, args: &[&str]) -> Run {
        run(Command::new(bin("imgdeploy")).arg("-c").arg(&self.config).args(args))
    }

    /// Starts `imgdeploy -c CONFIG apply` in the background, its output
    /// discarded: for the tests that kill it mid-way.
    pub fn spawn_apply(&self) -> std::process::Child {
        Command::new(bin("imgdeploy"))
            .arg("-c")
            .arg(&self.config)
            .arg("apply")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Starts `imgdeploy apply` in the background, waits up to `within`
    /// for `reached` while it still runs, lets it run `then` longer, and
    /// SIGKILLs it: the interrupted run a resume test starts from. Fails
    /// the test if the apply ended first (`what` names the point awaited).
    pub fn kill_apply_after(&self, what: &str, within: Duration, reached: impl Fn() -> bool, then: Duration) {
        let mut child = self.spawn_apply();
        let deadline = Instant::now() + within;
        while !reached() {
            assert!(child.try_wait().unwrap().is_none(), "apply ended before {what}");
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(then);
        assert!(child.try_wait().unwrap().is_none(), "apply ended before it could be killed ({what}, then {then:?})");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The `version` file as an unprivileged reader (uid 65534, like a web
    /// server) sees it through the link; None if it cannot read it.
    pub fn active_version(&self) -> Option<String> {
        crate::read_as_reader(&self.link.join("version")).ok()
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        self.imgdeploy(&["status", "--json"]).ok().json()
    }

    /// A slot's mount point.
    pub fn mount_point(&self, slot: &str) -> PathBuf {
        fs::canonicalize(&self.state).unwrap_or_else(|_| self.state.clone()).join("mnt").join(slot)
    }

    /// Each mount point (escaped as mountinfo writes it: a space is `\040`)
    /// with its per-mount options, from /proc/self/mountinfo.
    fn mount_table() -> Vec<(String, String)> {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ').skip(4);
                Some((f.next()?.to_owned(), f.next()?.to_owned()))
            })
            .collect()
    }

    fn escaped(p: &Path) -> String {
        p.to_string_lossy().replace(' ', "\\040")
    }

    /// The per-mount options (`ro`, `nodev`, ...) of what is mounted exactly at `p`, if anything.
    pub fn mount_options(p: &Path) -> Option<Vec<String>> {
        let p = Self::escaped(p);
        Self::mount_table()
            .into_iter()
            .find(|(point, _)| *point == p)
            .map(|(_, o)| o.split(',').map(str::to_owned).collect())
    }

    /// Whether something is mounted exactly at `p`.
    pub fn is_mounted(p: &Path) -> bool {
        Self::mount_options(p).is_some()
    }

    /// The invariant: `link` is missing (nothing deployed yet) or points at
    /// a mounted slot whose files an unprivileged reader can read.
    #[track_caller]
    pub fn assert_link_sound(&self) {
        let Ok(target) = fs::read_link(&self.link) else { return };
        let slot = ["a", "b"].into_iter().find(|s| self.mount_point(s) == target);
        assert!(slot.is_some(), "link points at {}, not a slot", target.display());
        assert!(Self::is_mounted(&target), "link points at {}, which is not mounted", target.display());
        if let Err(e) = crate::read_as_reader(&self.link.join("version")) {
            panic!("files under the link are unreadable for uid {}: {e}", crate::READER_UID);
        }
    }

    /// Loop devices backed by files in this state dir that no mount uses.
    pub fn leaked_loop_devices(&self) -> Vec<String> {
        let out = run(Command::new("losetup").args(["-l", "-n", "-O", "NAME,BACK-FILE"])).ok().stdout;
        let state = fs::canonicalize(&self.state).unwrap_or_else(|_| self.state.clone());
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        out.lines()
            .filter(|l| l.contains(&*state.to_string_lossy()))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|dev| {
                !mounts.lines().any(|m| m.split(" - ").nth(1).is_some_and(|r| r.split(' ').nth(1) == Some(*dev)))
            })
            .map(str::to_owned)
            .collect()
    }

    /// Runs `imgdeploy args` expecting a refusal: a non-zero exit, an
    /// `error:` line containing `needle`, the active version still `active`,
    /// `link` sound and nothing leaked.
    #[track_caller]
    pub fn assert_refused(&self, what: &str, args: &[&str], needle: &str, active: &str) {
        let mounted_before = self.mounts_in_state();
        let r = self.imgdeploy(args);
        assert_ne!(r.code, 0, "{what}: exit 0\n{}", r.stderr);
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{what}: no error line: {}", r.stderr));
        assert!(line.contains(needle), "{what}: {line:?} lacks {needle:?}");
        assert_eq!(self.active_version().as_deref(), Some(active), "{what}: the active version changed");
        self.assert_link_sound();
        self.assert_no_leaks();
        let stray: Vec<_> = self.mounts_in_state().difference(&mounted_before).cloned().collect();
        assert!(stray.is_empty(), "{what}: a refused command left new mounts behind: {stray:?}");
    }

    /// No loop device backed by a file in this state dir without a mount.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        let leaked = self.leaked_loop_devices();
        assert!(leaked.is_empty(), "leaked loop devices: {leaked:?}");
    }

    /// Mount points inside the state dir (the slots' `mnt/a`, `mnt/b`).
    pub fn mounts_in_state(&self) -> std::collections::BTreeSet<String> {
        let state = Self::escaped(&fs::canonicalize(&self.state).unwrap_or_else(|_| self.state.clone()));
        Self::mount_table().into_iter().map(|(point, _)| point).filter(|p| p.starts_with(&state)).collect()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for s in ["a", "b"] {
            let p = self.mount_point(s);
            for _ in 0..30 {
                if !Self::is_mounted(&p) {
                    break;
                }
                if run(Command::new("umount").arg(&p)).code != 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            if Self::is_mounted(&p) {
                // Last resort so the temp dir can go; a lazy unmount never deletes through the mount.
                run(Command::new("umount").arg("-l").arg(&p));
            }
        }
        if self.state_fs {
            // After the slots; lazily, so the temp dir can go whatever still holds it.
            if run(Command::new("umount").arg(&self.state)).code != 0 {
                run(Command::new("umount").arg("-l").arg(&self.state));
            }
        }
    }
}
