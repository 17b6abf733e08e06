//! Power loss: a qemu guest (Debian kernel, TCG) installs a first
//! version on an empty disk, applies two updates and rolls back, with
//! `state_dir` and `link` on an ext4 disk
//! (mounted `data=writeback,noauto_da_alloc`, so the filesystem adds no
//! ordering of its own beyond what fsync asks for), while qemu's
//! `blklogwrites` driver logs every write and flush the guest sends to that
//! disk. From the log we rebuild the disk as a power cut would have left it
//! after every single logged request: everything up to the last flush is
//! kept, and each write since then landed, was lost or was torn at 4 KiB
//! (drawn from a printed seed). On the host we check that every such disk
//! holds one consistent version.
//!
//! "Consistent" means: the ext4 filesystem mounts; `imgdeploy mount` (the
//! boot unit) brings `link` up on a verified image whose files are the ones
//! of the serial its signed manifest names (or, before the first install
//! completed, finds nothing deployed and no `link`); `status` agrees and reports no
//! problem; `verify` finds no bad slot; no step that had returned success
//! is undone (a rollback included: it stays sticky); and a plain `apply`
//! then completes.
//!
//! The guest writes a mark to a sector past the end of the filesystem after
//! each step returns, so the log shows from which write on each step must
//! survive. A kernel without device-mapper (these machines) cannot use
//! dm-flakey or dm-log-writes; qemu's driver writes the same log format.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use imgdeploy_builder::netboot::stripped;
use imgdeploy_tests::qemu::{boot, prerequisites, Initramfs};
use imgdeploy_tests::writelog::{PowerCut, Rng, WriteLog};
use imgdeploy_tests::{bin, build_image, noise, read_as_reader, readable_tempdir, run, sh, Keys, Run, READER_UID};

/// The guest's disk: a 60 MiB ext4 filesystem, then 4 MiB for marks.
const DISK_BYTES: u64 = 64 << 20;
const FS_SIZE: &str = "60M";
/// Sector (512 bytes) of the mark written after guest step K: MARK_SECTOR + 8 * K.
const MARK_SECTOR: u64 = 62 * 2048;
/// The serials the guest applies in turn; the host's repository ends up publishing the last.
const SERIALS: [u64; 3] = [1, 2, 3];
/// What a cut "serves" when nothing is deployed (no `link`).
const NOTHING: u64 = 0;

/// What the guest does, in order, after mounting its disk and the active slot.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Publish serial N (in the guest's copy of the repository) and `apply` it.
    Apply(u64),
    /// `rollback` to the standby slot.
    Rollback,
}

const STEPS: [Step; 4] = [Step::Apply(1), Step::Apply(2), Step::Apply(3), Step::Rollback];

impl Step {
    fn mark(self) -> Vec<u8> {
        match self {
            Step::Apply(s) => format!("IMGDEPLOY-APPLIED-{s}"),
            Step::Rollback => "IMGDEPLOY-ROLLED-BACK".to_owned(),
        }
        .into_bytes()
    }
}

/// What a cut may show when `done` guest steps had returned success before
/// it: the serials `link` may serve after boot, and after a plain `apply`
/// on the host (whose repository publishes serial 3).
/// A rollback records the serial it leaves (fsynced) before it moves the
/// link, so a cut that left the link on the rollback's target never lets
/// the next apply reinstall the rolled-back serial. (Regression: rollback
/// switched first and recorded afterwards.)
fn rollback_is_sticky(done: usize, served: u64, after_apply: u64) -> bool {
    !(done == 3 && served == 2 && after_apply != 2)
}

fn allowed(done: usize) -> (&'static [u64], &'static [u64]) {
    match done {
        // The first install, on an empty disk.
        0 => (&[NOTHING, 1], &[3]),
        // Applying 2.
        1 => (&[1, 2], &[3]),
        // Applying 3.
        2 => (&[2, 3], &[3]),
        // Rolling back to 2: if the rollback was recorded, apply keeps 2
        // (and once the link serves 2, it was: see `rollback_is_sticky`).
        3 => (&[2, 3], &[2, 3]),
        // Rolled back: 2, and it stays there.
        _ => (&[2], &[2]),
    }
}

struct Rig {
    work: tempfile::TempDir,
    keys: Keys,
    config: PathBuf,
    /// Where the disk is mounted, in the guest and on the host alike.
    mnt: PathBuf,
    repo: PathBuf,
}

impl Rig {
    fn imgdeploy(&self, args: &[&str]) -> Run {
        run(Command::new(bin("imgdeploy")).arg("--config").arg(&self.config).args(args))
    }

    /// Unmounts the disk and every slot mounted inside it.
    fn unmount(&self) {
        for _ in 0..50 {
            if run(Command::new("umount").arg("--recursive").arg(&self.mnt)).code == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("cannot unmount {}", self.mnt.display());
    }
}

/// A tree whose `serial` file names it; half its bytes are shared by all serials.
fn tree(dir: &Path, serial: u64) {
    fs::create_dir_all(dir.join("cgi-bin")).unwrap();
    fs::write(dir.join("serial"), format!("{serial}\n")).unwrap();
    fs::write(dir.join("common.bin"), noise(1_500_000, 99)).unwrap();
    fs::write(dir.join("own.bin"), noise(1_500_000, serial)).unwrap();
    for i in 0..50 {
        fs::write(dir.join(format!("cgi-bin/app{i}.cgi")), format!("#!/bin/sh\necho {serial} {i}\n")).unwrap();
    }
}

/// Keys, a repository with serials 1..3 (each manifest also kept as
/// `stable-N.json` for the guest to publish in turn), a config, and the
/// pristine disk: an empty ext4 filesystem.
fn setup(disk0: &Path) -> Rig {
    let work = readable_tempdir();
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    let mnt = work.path().join("disk");
    fs::create_dir_all(&mnt).unwrap();
    let config = work.path().join("imgdeploy.toml");
    fs::write(
        &config,
        format!(
            "source = \"{}\"\ntrusted_keys = [\"{}\"]\nstate_dir = \"{}\"\nlink = \"{}\"\ndrain_timeout = \"5s\"\n",
            repo.join("stable.json").display(),
            keys.public.display(),
            mnt.join("state").display(),
            mnt.join("current").display(),
        ),
    )
    .unwrap();
    let rig = Rig { work, keys, config, mnt, repo };

    File::create(disk0).unwrap().set_len(DISK_BYTES).unwrap();
    sh(&format!(
        "mkfs.ext4 -q -F -L powerloss -E lazy_itable_init=0,lazy_journal_init=0,nodiscard {} {FS_SIZE}",
        disk0.display()
    ));
    for s in SERIALS {
        let t = rig.work.path().join(format!("tree-{s}"));
        tree(&t, s);
        build_image(&t, &rig.keys, "stable", &rig.repo, &["--version", &format!("v{s}")]);
        for ext in ["json", "json.sig"] {
            fs::copy(rig.repo.join(format!("stable.{ext}")), rig.repo.join(format!("stable-{s}.{ext}"))).unwrap();
        }
    }
    rig
}

/// The guest's /init: boot-mount, then the [`STEPS`], marking the disk
/// after each success, then power off.
fn init_script(rig: &Rig) -> String {
    let cfg = rig.config.display();
    let repo = rig.repo.display();
    let mut s = format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /tmp
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /lib/modules/order); do $B insmod $m || echo "GUEST insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 400 ]; do $B sleep 0.05; i=$((i+1)); done
$B mount -t ext4 -o data=writeback,noauto_da_alloc /dev/vda {mnt}; echo "GUEST mount-fs rc=$?"
/bin/imgdeploy --config {cfg} mount; echo "GUEST boot-mount rc=$?"
"#,
        mnt = rig.mnt.display()
    );
    for (k, step) in STEPS.iter().enumerate() {
        let (name, cmd) = match step {
            Step::Apply(serial) => {
                s.push_str(&format!(
                    "$B cp {repo}/stable-{serial}.json {repo}/stable.json\n$B cp {repo}/stable-{serial}.json.sig {repo}/stable.json.sig\n"
                ));
                (format!("apply-{serial}"), "apply")
            }
            Step::Rollback => ("rollback".to_owned(), "rollback"),
        };
        s.push_str(&format!(
            r#"/bin/imgdeploy --config {cfg} {cmd}; rc=$?; echo "GUEST {name} rc=$rc"
[ $rc = 0 ] && $B printf '{mark}' | $B dd of=/dev/vda bs=512 seek={sector} conv=notrunc,fsync 2>/dev/null
"#,
            mark = String::from_utf8(step.mark()).unwrap(),
            sector = MARK_SECTOR + 8 * k as u64,
        ));
    }
    s.push_str("$B sync\necho GUEST done\n$B poweroff -f\n");
    s
}

/// What a power cut left: the serial `link` served after boot and after a
/// plain `apply`, or why the state is broken.
fn check_cut(rig: &Rig, disk: &Path) -> Result<(u64, u64), String> {
    let m = run(Command::new("mount").args(["-t", "ext4", "-o", "loop"]).arg(disk).arg(&rig.mnt));
    if m.code != 0 {
        return Err(format!("the filesystem does not mount: {}", m.stderr.trim()));
    }
    let r = (|| {
        let boot = rig.imgdeploy(&["mount"]);
        if boot.code != 0 {
            return Err(format!("`imgdeploy mount` at boot failed: {}", boot.stderr.trim()));
        }
        let link = rig.mnt.join("current");
        let serial = if link.symlink_metadata().is_err() && boot.stdout.contains("nothing deployed yet") {
            NOTHING
        } else {
            let served = read_as_reader(&link.join("serial"))
                .map_err(|e| format!("link does not serve a tree to uid {READER_UID} after boot: {e}"))?;
            served.trim().parse().map_err(|_| format!("link serves serial file {served:?}"))?
        };
        let st = rig.imgdeploy(&["status", "--json"]);
        if st.code != 0 {
            return Err(format!("status failed: {}", st.stderr.trim()));
        }
        let st = st.json();
        if st["active"]["serial"].as_u64().unwrap_or(NOTHING) != serial {
            return Err(format!("link serves serial {serial} but status says {}", st["active"]));
        }
        if !st["errors"].as_array().is_some_and(Vec::is_empty) {
            return Err(format!("status reports problems: {}", st["errors"]));
        }
        let v = rig.imgdeploy(&["verify", "--json"]);
        if v.code != 0 {
            return Err(format!("verify failed: {} {}", v.stdout.trim(), v.stderr.trim()));
        }
        let up = rig.imgdeploy(&["apply"]);
        if up.code != 0 {
            return Err(format!("apply after the power cut failed: {}", up.stderr.trim()));
        }
        let now = fs::read_to_string(rig.mnt.join("current/serial")).map_err(|e| e.to_string())?;
        let after: u64 = now.trim().parse().map_err(|_| format!("link serves serial file {now:?} after apply"))?;
        // Staying on 2 with 3 published is right only when a rollback from 3 was recorded.
        let st = rig.imgdeploy(&["status", "--json"]).json();
        if after == 2 && st["rolled_back_serial"].as_u64() != Some(3) {
            return Err(format!("apply stayed on serial 2 without a recorded rollback: {}", st["last_apply"]));
        }
        Ok((serial, after))
    })();
    rig.unmount();
    r
}

#[test]
fn privileged_power_loss_leaves_one_consistent_version() {
    let Some((kernel, modules)) = prerequisites("privileged_power_loss_leaves_one_consistent_version") else {
        return;
    };
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let disk0 = scratch.path().join("disk0.img");
    let rig = setup(&disk0);

    // The guest: busybox, imgdeploy (without debug sections) and its libraries,
    // the modules for virtio disks, ext4, loop and squashfs, the repository,
    // key and config at their host paths.
    let initrd = scratch.path().join("initrd.cpio");
    let mut root = Initramfs::create(&initrd);
    root.bytes("init", 0o755, init_script(&rig).as_bytes());
    root.file("bin/busybox", Path::new("/bin/busybox"));
    root.binary("bin/imgdeploy", &stripped(&bin("imgdeploy"), scratch.path()));
    root.modules(&modules, &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "loop", "squashfs"]);
    root.mirror(&rig.repo);
    root.mirror(&rig.config);
    root.mirror(&rig.keys.public);
    root.dir(&rig.mnt.to_string_lossy());
    root.finish();

    let live = scratch.path().join("disk.img");
    let log_path = scratch.path().join("disk.log");
    fs::copy(&disk0, &live).unwrap();
    File::create(&log_path).unwrap();
    let drives = [
        format!("driver=file,node-name=disk,filename={}", live.display()),
        format!("driver=file,node-name=log,filename={}", log_path.display()),
        "driver=blklogwrites,node-name=logged,file=disk,log=log,log-sector-size=512".to_owned(),
    ];
    let mut extra = Vec::new();
    for d in &drives {
        extra.extend(["-blockdev", d.as_str()]);
    }
    // No write-zeroes or discard: every write carries its data in the log
    // (and older qemu's blklogwrites can misplace a logged write-zeroes).
    extra.extend(["-device", "virtio-blk-pci,drive=logged,write-zeroes=off,discard=off"]);
    let console = boot(&kernel, &initrd, "", &extra, 300);
    for step in
        ["mount-fs rc=0", "boot-mount rc=0", "apply-1 rc=0", "apply-2 rc=0", "apply-3 rc=0", "rollback rc=0", "done"]
    {
        assert!(console.contains(&format!("GUEST {step}")), "guest step `{step}` missing:\n{console}");
    }
    let guest_s = started.elapsed().as_secs_f64();

    let log = WriteLog::open(&log_path).unwrap();
    let n = log.entries.len();
    let flushes = log.entries.iter().filter(|e| e.is_flush()).count();
    let written: u64 = log.entries.iter().filter(|e| e.touches_disk()).map(|e| e.nr_sectors * log.sector_size).sum();

    // The log is faithful: replaying all of it onto the pristine disk gives the guest's disk.
    let replayed = scratch.path().join("replayed.img");
    fs::copy(&disk0, &replayed).unwrap();
    log.apply_range(&fs::OpenOptions::new().write(true).open(&replayed).unwrap(), 0..n).unwrap();
    assert!(
        fs::read(&replayed).unwrap() == fs::read(&live).unwrap(),
        "replaying the write log does not rebuild the disk"
    );
    fs::remove_file(&replayed).unwrap();

    // From which entry on each step must survive.
    let marks: Vec<usize> = STEPS
        .iter()
        .map(|step| {
            let at = log.writes_starting_with(&step.mark()).unwrap();
            assert_eq!(at.len(), 1, "mark of {step:?} found {} times in the log", at.len());
            at[0]
        })
        .collect();

    // A cut after every entry of the log: after a flush it is clean; elsewhere
    // each write since the last flush lands, is lost or is torn (seeded).
    // IMGDEPLOY_POWERLOSS_ROUNDS draws more fates for the unclean ones.
    let rounds: usize = std::env::var("IMGDEPLOY_POWERLOSS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let seed: u64 = std::env::var("IMGDEPLOY_POWERLOSS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("power loss: seed {seed} (IMGDEPLOY_POWERLOSS_SEED={seed} repeats this run)");
    let mut rng = Rng(seed);
    let mut cuts: Vec<PowerCut> = Vec::new();
    for round in 0..rounds {
        for at in 1..=n {
            let cut = log.random_cut(at, &mut rng);
            if round == 0 || !cut.fates.is_empty() {
                cuts.push(cut);
            }
        }
    }
    cuts.sort_by_key(|c| (c.durable, c.at));

    // Walk the cuts in order, keeping a disk with everything durable so far.
    let base = scratch.path().join("base.img");
    let cut_disk = scratch.path().join("cut.img");
    fs::copy(&disk0, &base).unwrap();
    let base_file = fs::OpenOptions::new().write(true).open(&base).unwrap();
    let mut applied = 0;
    let mut served: BTreeMap<u64, usize> = BTreeMap::new();
    let mut damaged_writes = 0;
    let mut broken = Vec::new();
    for cut in &cuts {
        log.apply_range(&base_file, applied..cut.durable).unwrap();
        applied = cut.durable;
        fs::copy(&base, &cut_disk).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&cut_disk).unwrap();
        damaged_writes += log.apply_fates(&f, cut, &mut rng).unwrap();
        drop(f);
        let done = marks.iter().filter(|&&m| m < cut.at).count();
        let (may_serve, may_end) = allowed(done);
        match check_cut(&rig, &cut_disk) {
            Ok((s, end)) if may_serve.contains(&s) && may_end.contains(&end) && rollback_is_sticky(done, s, end) => {
                *served.entry(s).or_default() += 1
            }
            Ok((s, end)) => broken.push(format!(
                "cut at entry {} of {n}, after {:?} had returned: served serial {s} at boot (allowed {may_serve:?}) and {end} after apply (allowed {may_end:?})",
                cut.at,
                &STEPS[..done]
            )),
            Err(why) => broken.push(format!("cut at entry {} of {n} ({} unflushed writes): {why}", cut.at, cut.fates.len())),
        }
    }
    eprintln!(
        "RELIABILITY power-loss cuts={} clean={} unclean={} log_entries={n} flushes={} written_mib={:.1} damaged_writes={damaged_writes} served={served:?} broken_states={} guest_s={guest_s:.0} total_s={:.0}",
        cuts.len(),
        cuts.iter().filter(|c| c.fates.is_empty()).count(),
        cuts.iter().filter(|c| !c.fates.is_empty()).count(),
        flushes,
        written as f64 / (1 << 20) as f64,
        broken.len(),
        started.elapsed().as_secs_f64(),
    );
    assert!(
        broken.is_empty(),
        "{} of {} power cuts left a broken state:\n{}",
        broken.len(),
        cuts.len(),
        broken.join("\n")
    );
    // The cuts must span every switch and must really have lost writes, or this test proves nothing.
    for s in [NOTHING, 1, 2, 3] {
        assert!(served.contains_key(&s), "no cut left serial {s} active (0: nothing): {served:?}");
    }
    assert!(damaged_writes > 0, "no cut lost or tore a write");
}
