//! imgdeploy end to end (issue 3): real nginx on 127.0.0.1, real loop
//! mounts, real processes holding mounts, SIGKILL at many points.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::{image_path, ImageRef, Manifest, Timestamp, FORMAT_VERSION};
use imgdeploy_common::sign::PrivateKey;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::faults::{FaultServer, Reply};
use imgdeploy_tests::snapshot::{assert_same, snapshot};
use imgdeploy_tests::{bin, require_root, run, sh, Keys};

fn flip_byte(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    let i = at % b.len();
    b[i] ^= 0x40;
    fs::write(p, b).unwrap();
}

#[test]
fn privileged_full_cycle_through_nginx() {
    if !require_root("privileged_full_cycle_through_nginx") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    let out = d.imgdeploy(&["apply", "--json"]).ok().json();
    assert_eq!(
        (out["result"].as_str(), out["serial"].as_u64(), out["slot"].as_str()),
        (Some("switched"), Some(1), Some("a"))
    );
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    assert_same(&snapshot(&d.dir.path().join("tree-stable-v1")), &snapshot(&fs::canonicalize(&d.link).unwrap()));

    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    assert_same(&snapshot(&d.dir.path().join("tree-stable-v2")), &snapshot(&fs::canonicalize(&d.link).unwrap()));
    assert!(!Deployment::is_mounted(&d.mount_point("a")), "old slot left mounted though nobody used it");

    // Idempotent.
    let again = d.imgdeploy(&["apply"]).ok();
    assert!(again.stdout.contains("up to date: already at serial 2"), "{}", again.stdout);

    let st = d.status();
    assert_eq!(st["format"], 1);
    assert_eq!(st["active"]["slot"], "b");
    assert_eq!(st["active"]["serial"], 2);
    assert_eq!(st["active"]["version"], "v2");
    assert_eq!(st["active"]["mounted"].as_str().unwrap(), d.mount_point("b").to_str().unwrap());
    assert!(st["active"]["device"].as_str().unwrap().starts_with("/dev/loop"));
    assert_eq!(st["standby"]["serial"], 1);
    assert_eq!(st["standby"]["mounted"], serde_json::Value::Null);
    assert_eq!(st["last_apply"]["result"], "up-to-date");
    assert_eq!(st["link_target"].as_str().unwrap(), d.mount_point("b").to_str().unwrap());

    // Rollback and forward again.
    d.imgdeploy(&["rollback"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    let skip = d.imgdeploy(&["apply"]).ok();
    assert!(skip.stdout.contains("serial 2 was rolled back"), "{}", skip.stdout);
    d.publish("v3");
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    assert_eq!(d.status()["rolled_back_serial"], serde_json::Value::Null);

    // verify: both fine, then a flipped byte in the standby image is named.
    d.imgdeploy(&["verify"]).ok();
    let standby = d.status()["standby"]["slot"].as_str().unwrap().to_owned();
    flip_byte(&d.state.join(format!("slots/{standby}/image.squashfs")), 5000);
    d.imgdeploy(&["verify"]).fails_with(&format!("slot {standby} failed verification"));
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    // ...and rollback refuses to mount it.
    d.imgdeploy(&["rollback"]).fails_with("sha256");
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    d.assert_no_leaks();
}

#[test]
fn privileged_drain_waits_for_holders_and_busy_standby_stops_apply() {
    if !require_root("privileged_drain_waits_for_holders_and_busy_standby_stops_apply") {
        return;
    }
    let d = Deployment::new("", "");
    d.write_config("drain_timeout = \"20s\"");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // A process with its cwd inside the old mount (reached through the link).
    let mut holder = Command::new("sleep").arg("2").current_dir(&d.link).spawn().unwrap();
    d.publish("v2");
    let t = Instant::now();
    d.imgdeploy(&["apply"]).ok();
    let waited = t.elapsed();
    holder.wait().unwrap();
    assert!(waited >= Duration::from_millis(1500), "apply did not wait for the holder ({waited:?})");
    assert!(!Deployment::is_mounted(&d.mount_point("a")), "old slot not unmounted after its user left");

    // A holder that outlives drain_timeout: the old slot stays mounted and is named.
    d.write_config("drain_timeout = \"1s\"");
    let mut holder = Command::new("sleep").arg("60").current_dir(&d.link).spawn().unwrap();
    d.publish("v3");
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(out.stdout.contains(&format!("in use by pid {} (sleep, cwd)", holder.id())), "{}", out.stdout);
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    assert!(Deployment::is_mounted(&d.mount_point("b")));
    let st = d.status();
    assert_eq!(st["standby"]["users"][0]["pid"].as_u64(), Some(holder.id() as u64));
    // The next apply needs that slot: it stops and names the process.
    d.publish("v4");
    d.imgdeploy(&["apply"]).fails_with(&format!(
        "slot b ({}) is still in use by pid {} (sleep, cwd)",
        d.mount_point("b").display(),
        holder.id()
    ));
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    // `drain` by hand: names the holder while it stays, unmounts once it left.
    d.imgdeploy(&["drain", "--timeout", "1s"])
        .fails_with(&format!("standby slot is still in use by pid {} (sleep, cwd)", holder.id()));
    assert!(Deployment::is_mounted(&d.mount_point("b")), "drain unmounted a slot in use");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = d.imgdeploy(&["drain"]).ok();
    assert!(out.stdout.contains("standby slot unmounted"), "{}", out.stdout);
    assert!(!Deployment::is_mounted(&d.mount_point("b")), "drain left the idle standby mounted");
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v4"));
    d.assert_no_leaks();
}

/// Slots are mounted read-only with `nodev,nosuid` by default, and with
/// exactly the configured `mount_options` otherwise; an older serial is
/// refused unless `allow_downgrade` is set.
#[test]
fn privileged_mount_options_and_allow_downgrade() {
    if !require_root("privileged_mount_options_and_allow_downgrade") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    let old: Vec<(String, Vec<u8>)> =
        ["stable.json", "stable.json.sig"].iter().map(|f| (f.to_string(), fs::read(d.repo.join(f)).unwrap())).collect();
    d.imgdeploy(&["apply"]).ok();
    let flags = Deployment::mount_options(&d.mount_point("a")).expect("slot a is mounted");
    for f in ["ro", "nodev", "nosuid"] {
        assert!(flags.contains(&f.to_owned()), "default mount lacks {f}: {flags:?}");
    }
    assert!(!flags.contains(&"noexec".to_owned()), "{flags:?}");

    d.write_config("mount_options = \"noexec,noatime\"\n");
    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    let flags = Deployment::mount_options(&d.mount_point("b")).expect("slot b is mounted");
    for f in ["ro", "noexec", "noatime"] {
        assert!(flags.contains(&f.to_owned()), "configured mount lacks {f}: {flags:?}");
    }
    for f in ["nodev", "nosuid"] {
        assert!(!flags.contains(&f.to_owned()), "{f} was not asked for: {flags:?}");
    }

    // The server goes back to serial 1 (a correctly signed, older manifest).
    for (name, bytes) in &old {
        fs::write(d.repo.join(name), bytes).unwrap();
    }
    d.imgdeploy(&["apply"]).fails_with("refusing to go back");
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    d.write_config("allow_downgrade = true\n");
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    assert_eq!(d.status()["active"]["serial"], 1);
    d.assert_no_leaks();
}

#[test]
fn privileged_readers_see_no_errors_during_switches() {
    if !require_root("privileged_readers_see_no_errors_during_switches") {
        return;
    }
    let d = Deployment::new("drain_timeout = \"0s\"", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, reads, errors, file) = (stop.clone(), reads.clone(), errors.clone(), d.link.join("version"));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match fs::read_to_string(&file) {
                        Ok(s) if s == "v1" || s == "v2" => reads.fetch_add(1, Ordering::Relaxed),
                        _ => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let switches = 1000;
    for _ in 0..switches {
        d.imgdeploy(&["rollback"]).ok();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let (reads, errors) = (reads.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    eprintln!("{switches} switches, {reads} reads through the link, {errors} errors");
    assert_eq!(errors, 0);
    assert!(reads > 1000, "readers barely ran ({reads} reads)");
    d.assert_link_sound();
}

/// Kills apply with SIGKILL at spread-out moments of a slow download (nginx
/// limit_rate), checks the invariants after each kill, then that the next
/// apply completes.
#[test]
fn privileged_sigkill_at_any_point_keeps_link_sound() {
    if !require_root("privileged_sigkill_at_any_point_keeps_link_sound") {
        return;
    }
    let d = Deployment::new("", "limit_rate 4m;");
    d.publish("v0");
    d.imgdeploy(&["apply"]).ok();
    // Measure one full slow apply to spread the kill points over it.
    d.publish_to("stable", "v1", 1_500_000, &["--level", "1"]);
    let t = Instant::now();
    d.imgdeploy(&["apply"]).ok();
    let full = t.elapsed();
    let rounds = 24;
    let mut killed_mid_way = 0;
    for i in 0..rounds {
        let label = format!("k{i}");
        d.publish_to("stable", &label, 1_500_000, &["--level", "1"]);
        let delay = full.mul_f64((i as f64 + 0.5) / rounds as f64 * 1.1);
        let mut child = Command::new(bin("imgdeploy"))
            .arg("-c")
            .arg(&d.config)
            .arg("apply")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        // SIGKILL: no chance to clean up.
        if child.try_wait().unwrap().is_none() {
            killed_mid_way += 1;
        }
        child.kill().ok();
        child.wait().unwrap();
        d.assert_link_sound();
        d.assert_no_leaks();
        let v = d.active_version().unwrap();
        assert!(v == label || v.starts_with('k') || v == "v1", "link shows {v}");
        d.imgdeploy(&["apply"]).ok();
        assert_eq!(d.active_version().as_deref(), Some(label.as_str()));
        d.assert_no_leaks();
    }
    eprintln!("{rounds} kills, {killed_mid_way} while apply was running, 0 broken states");
    assert!(killed_mid_way >= rounds / 2, "too few kills landed while apply ran ({killed_mid_way})");
}

#[test]
fn privileged_interrupted_download_resumes_with_range() {
    if !require_root("privileged_interrupted_download_resumes_with_range") {
        return;
    }
    let d = Deployment::new("", "limit_rate 1m;");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // Without a local chunk index there is nothing to reuse: a plain (full) download.
    fs::remove_file(d.state.join("slots/a/index.idx")).unwrap();
    let out = d.publish_to("stable", "v2", 4_000_000, &["--level", "1"]);
    let size = out["size"].as_u64().unwrap();
    let mut child = Command::new(bin("imgdeploy"))
        .arg("-c")
        .arg(&d.config)
        .arg("apply")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until part of the image arrived, then kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    let partial = d.state.join("slots/b/image.partial");
    while fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 1_000_000 {
        assert!(Instant::now() < deadline, "download never progressed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let have = d.status()["pending"]["bytes"].as_u64().unwrap();
    assert!(have > 0 && have < size, "pending {have} of {size}");
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    let r = d.imgdeploy(&["apply", "--json"]).ok().json();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    let downloaded = r["download"]["downloaded"].as_u64().unwrap();
    let resumed = r["download"]["resumed_from"].as_u64().unwrap();
    assert!(
        resumed >= have.min(1_000_000) && downloaded + resumed == size,
        "resumed {resumed} + downloaded {downloaded} != {size}"
    );
    let log = d.nginx.log();
    assert!(
        log.iter().any(|l| l.contains("GET /images/") && l.contains("\"bytes=") && l.contains(" 206 ")),
        "no Range request in {log:#?}"
    );
    d.imgdeploy(&["verify"]).ok();
}

/// Signs an arbitrary manifest with the test key (for payloads imgbuild would never publish).
fn sign_manifest(keys: &Keys, repo: &Path, channel: &str, serial: u64, payload: &[u8], expires_in: u64) {
    let key = PrivateKey::read(&keys.key).unwrap();
    let sha = Sha256Digest::of_bytes(payload);
    fs::create_dir_all(repo.join("images")).unwrap();
    fs::write(repo.join(image_path(&sha)), payload).unwrap();
    let now = Timestamp::now();
    let m = Manifest {
        format: FORMAT_VERSION,
        channel: channel.into(),
        serial,
        version: format!("crafted-{serial}"),
        created: now,
        expires: now.plus(Duration::from_secs(expires_in)),
        image: ImageRef {
            path: image_path(&sha),
            sha256: sha,
            size: payload.len() as u64,
            format: "squashfs".into(),
            compression: "zstd".into(),
        },
        index: None,
        rollout: None,
    };
    let bytes = m.to_bytes();
    fs::write(repo.join(format!("{channel}.json")), &bytes).unwrap();
    fs::write(repo.join(format!("{channel}.json.sig")), key.sign(&bytes)).unwrap();
}

/// Every bad input: a one-line error saying what to do, a non-zero exit, the
/// active version still serving, nothing leaked; and a clean apply afterwards.
#[test]
fn privileged_bad_inputs_leave_the_active_version_serving() {
    if !require_root("privileged_bad_inputs_leave_the_active_version_serving") {
        return;
    }
    let d = Deployment::new("", "location /fail/ { return 500; }");
    let v1 = d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let repo = &d.repo;
    let old_manifest = fs::read(repo.join("stable.json")).unwrap();
    let old_sig = fs::read(repo.join("stable.json.sig")).unwrap();
    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    let v2_image = repo.join(d.status()["active"]["sha256"].as_str().map(|s| format!("images/{s}.squashfs")).unwrap());
    let check = |what: &str, args: &[&str], needle: &str| d.assert_refused(what, args, needle, "v2");
    let serving = |what: &str, want: &str| {
        assert_eq!(d.active_version().as_deref(), Some(want), "{what}: active version changed")
    };

    d.publish("v3");
    let faults = FaultServer::start();
    let unreachable = "http://127.0.0.1:9/stable.json".to_string();
    check("unreachable", &["apply", "--source", &unreachable], "cannot fetch");
    serving("unreachable", "v2");
    check("404", &["apply", "--source", &d.nginx.url("nope.json")], "HTTP 404");
    check("500", &["apply", "--source", &d.nginx.url("fail/stable.json")], "HTTP 500");
    serving("500", "v2");

    // Manifest served by the fault server, image cut short / too long / dropped mid-body.
    let manifest = fs::read(repo.join("stable.json")).unwrap();
    let sig = fs::read(repo.join("stable.json.sig")).unwrap();
    let m = Manifest::parse(&manifest).unwrap();
    let image = fs::read(repo.join(&m.image.path)).unwrap();
    faults.route("/stable.json", Reply::Body(manifest.clone()));
    faults.route("/stable.json.sig", Reply::Body(sig.clone()));
    let img_route = format!("/{}", m.image.path);
    faults.route(&img_route, Reply::Truncated(image.clone(), image.len() / 2));
    check("dropped mid-body", &["apply", "--source", &faults.url("/stable.json")], "transfer broke");
    serving("dropped", "v2");
    faults.route(&img_route, Reply::TooLong(image.clone(), 10));
    check("body too long", &["apply", "--source", &faults.url("/stable.json")], "longer than the");
    faults.route(&img_route, Reply::Body(image[..image.len() - 100].to_vec()));
    check("body too short", &["apply", "--source", &faults.url("/stable.json")], "ended after");
    let mut bad = image.clone();
    bad[image.len() / 3] ^= 1;
    faults.route(&img_route, Reply::Body(bad));
    check("tampered image in transit", &["apply", "--source", &faults.url("/stable.json")], "sha256");
    faults.route(&img_route, Reply::Stall(image.clone(), image.len() / 3));
    let cfg_before = fs::read_to_string(&d.config).unwrap();
    fs::write(&d.config, format!("{cfg_before}download_timeout = \"2s\"\n")).unwrap();
    let t = Instant::now();
    check("stalled mid-body", &["apply", "--source", &faults.url("/stable.json")], "rerun to resume");
    assert!(t.elapsed() < Duration::from_secs(20), "a stalled server held apply for {:?}", t.elapsed());
    fs::write(&d.config, &cfg_before).unwrap();
    faults.route("/loop.json", Reply::RedirectLoop);
    check("redirect loop", &["apply", "--source", &faults.url("/loop.json")], "cannot fetch");
    faults.route(&img_route, Reply::Status(503));
    check("503 for the image", &["apply", "--source", &faults.url("/stable.json")], "HTTP 503");
    let mut badm = manifest.clone();
    badm[40] ^= 1;
    faults.route("/stable.json", Reply::Body(badm));
    check("tampered manifest", &["apply", "--source", &faults.url("/stable.json")], "does not verify");
    faults.route("/stable.json", Reply::Body(manifest.clone()));
    let mut bads = sig.clone();
    bads[3] ^= 1;
    faults.route("/stable.json.sig", Reply::Body(bads));
    check("tampered signature", &["apply", "--source", &faults.url("/stable.json")], "does not verify");
    faults.route("/stable.json.sig", Reply::Body(sig[..32].to_vec()));
    check("short signature", &["apply", "--source", &faults.url("/stable.json")], "64");
    faults.route("/stable.json", Reply::Body(vec![b' '; 100_000]));
    check("huge manifest", &["apply", "--source", &faults.url("/stable.json")], "larger than the allowed");
    serving("faults", "v2");

    // Wrong key.
    let other = Keys::generate();
    let cfg = fs::read_to_string(&d.config).unwrap();
    fs::write(&d.config, cfg.replace(d.keys.public.to_str().unwrap(), other.public.to_str().unwrap())).unwrap();
    check("untrusted key", &["apply"], "does not verify with any of the 1 trusted key");
    fs::write(&d.config, &cfg).unwrap();
    // Tampered image on the server.
    let v3_image = repo.join(&Manifest::parse(&fs::read(repo.join("stable.json")).unwrap()).unwrap().image.path);
    flip_byte(&v3_image, 100);
    check("tampered image on the server", &["apply"], "sha256");
    flip_byte(&v3_image, 100);
    // Other channel's (correctly signed) manifest.
    d.publish_to("beta", "beta1", 0, &[]);
    check(
        "other channel",
        &["apply", "--source", &d.nginx.url("beta.json")],
        "is for channel `beta` but this host follows `stable`",
    );
    // Downgrade: the old serial-1 manifest replayed.
    fs::write(repo.join("old.json"), &old_manifest).unwrap();
    fs::write(repo.join("old.json.sig"), &old_sig).unwrap();
    let r = d.imgdeploy(&["apply", "--source", &d.nginx.url("old.json")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("is for channel `stable`") || r.stderr.contains("refusing to go back"), "{}", r.stderr);
    // (old.json claims channel stable; the serial check is what refuses it.)
    assert!(r.stderr.contains("refusing to go back"), "{}", r.stderr);
    serving("downgrade", "v2");
    // Expired manifest.
    d.publish_to("stable", "v-exp", 0, &["--expires-in", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    check("expired", &["apply"], "expired");
    // Not squashfs, correctly signed.
    sign_manifest(&d.keys, repo, "stable", 100, &vec![0x5au8; 8192], 3600);
    check("payload not squashfs", &["apply"], "not a usable squashfs image");
    serving("not squashfs", "v2");
    // Corrupt state file.
    let state_file = d.state.join("state.json");
    let saved = fs::read(&state_file).unwrap();
    fs::write(&state_file, b"{ not json").unwrap();
    check("corrupt state", &["apply"], "is corrupt");
    fs::write(&state_file, &saved).unwrap();
    // Two applies at once.
    let mut locker = Command::new("flock").arg("-o").arg(d.state.join("lock")).args(["sleep", "5"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    check("concurrent apply", &["apply"], "another imgdeploy is working");
    locker.kill().unwrap();
    locker.wait().unwrap();
    // Bad config.
    fs::write(&d.config, format!("{cfg}\nalow_downgrade = true\n")).unwrap();
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("imgdeploy.toml:") && r.stderr.contains("alow_downgrade"), "{}", r.stderr);
    fs::write(&d.config, &cfg).unwrap();

    // A state_dir or link directory other users can write is refused (a local
    // attacker must not be able to redirect what gets mounted or served).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&d.state, fs::Permissions::from_mode(0o777)).unwrap();
    check("world-writable state_dir", &["apply"], "is writable by other users");
    fs::set_permissions(&d.state, fs::Permissions::from_mode(0o700)).unwrap();
    let webroot = d.link.parent().unwrap().to_owned();
    fs::set_permissions(&webroot, fs::Permissions::from_mode(0o777)).unwrap();
    d.publish("v3b");
    check("world-writable link directory", &["apply"], "is writable by other users");
    fs::set_permissions(&webroot, fs::Permissions::from_mode(0o755)).unwrap();

    // After all that, a good publish applies cleanly.
    let _ = (v1, v2_image);
    d.publish("v4");
    d.imgdeploy(&["apply"]).ok();
    serving("final", "v4");
    d.assert_no_leaks();
}

#[test]
fn privileged_disk_full_fails_cleanly_then_recovers() {
    if !require_root("privileged_disk_full_fails_cleanly_then_recovers") {
        return;
    }
    let d = Deployment::new("", "");
    fs::create_dir_all(&d.state).unwrap();
    sh(&format!("mount -t tmpfs -o size=3m,mode=0700 tmpfs '{}'", d.state.display()));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            run(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
    let _guard = Unmount(d.state.clone());
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    d.publish_to("stable", "v2", 5_000_000, &["--level", "1"]);
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.lines().any(|l| l.starts_with("error:") && l.contains("free space in state_dir")), "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    d.assert_link_sound();
    d.assert_no_leaks();
    sh(&format!("mount -o remount,size=64m '{}'", d.state.display()));
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
}

#[test]
fn privileged_mount_at_boot_restores_link() {
    if !require_root("privileged_mount_at_boot_restores_link") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // Simulate a reboot: mounts gone, link gone (e.g. on tmpfs).
    run(Command::new("umount").arg(d.mount_point("a"))).ok();
    fs::remove_file(&d.link).unwrap();
    d.imgdeploy(&["mount"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    // Idempotent.
    d.imgdeploy(&["mount"]).ok();
    d.assert_no_leaks();
    // A tampered active image is refused at boot instead of being mounted.
    run(Command::new("umount").arg(d.mount_point("a"))).ok();
    flip_byte(&d.state.join("slots/a/image.squashfs"), 9);
    d.imgdeploy(&["mount"]).fails_with("sha256");
    d.assert_no_leaks();
}

/// Hooks: `health_check` sees the new mount before the switch and can veto
/// it; `post_switch` runs after the switch and its failure is reported
/// without undoing it; a hook that hangs is killed together with its
/// children; a hook's stdout never reaches imgdeploy's (data) stdout.
#[test]
fn privileged_hooks_gate_and_follow_the_switch() {
    if !require_root("privileged_hooks_gate_and_follow_the_switch") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let dir = d.dir.path();
    let log = dir.join("hooks.log");
    let hook = |name: &str| {
        let path = dir.join(format!("{name}.sh"));
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{name} $1 serial=$IMGDEPLOY_SERIAL version=$IMGDEPLOY_VERSION new=$(cat \"$1/version\") link=$(cat {link}/version)\" >> {log}\necho stdout noise from {name}\nexit $(cat {dir}/{name}.rc)\n",
                link = d.link.display(),
                log = log.display(),
                dir = dir.display(),
            ),
        )
        .unwrap();
        sh(&format!("chmod 755 {}", path.display()));
        path
    };
    let (check, post) = (hook("check"), hook("post"));
    let rc = |name: &str, code: u8| fs::write(dir.join(format!("{name}.rc")), code.to_string()).unwrap();
    let hooks = format!("health_check = \"{}\"\npost_switch = \"{}\"\n", check.display(), post.display());
    d.write_config(&hooks);
    let logged = || fs::read_to_string(&log).unwrap_or_default();

    // A failing health check vetoes serial 2: v1 keeps serving, slot b is not left mounted.
    d.publish("v2");
    rc("check", 1);
    rc("post", 0);
    d.assert_refused("failing health_check", &["apply"], "health_check", "v1");
    let standby = d.mount_point("b");
    assert!(
        logged().contains(&format!("check {} serial=2 version=v2 new=v2 link=v1", standby.display())),
        "the health check did not see the new mount before the switch:\n{}",
        logged()
    );
    assert!(!logged().contains("post "), "post_switch ran without a switch:\n{}", logged());

    // Passing: the switch happens, then post_switch sees it; stdout stays JSON.
    rc("check", 0);
    let r = d.imgdeploy(&["apply", "--json"]).ok();
    assert_eq!(r.json()["result"], "switched", "{}", r.stdout);
    assert!(r.stderr.contains("stdout noise from check"), "hook output belongs on stderr: {}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    assert!(
        logged().ends_with(&format!("post {} serial=2 version=v2 new=v2 link=v2\n", standby.display())),
        "{}",
        logged()
    );

    // A failing post_switch is reported, but the switch stands.
    d.publish("v3");
    rc("post", 3);
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0, "a failed post_switch must not exit 0");
    assert!(r.stderr.contains("switched to serial 3, but post_switch"), "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v3"));

    // A hung health check is killed with its children after hook_timeout.
    d.publish("v4");
    d.write_config("health_check = \"sleep 31.717 & sleep 31.718; true\"\nhook_timeout = \"1s\"\n");
    let started = Instant::now();
    d.assert_refused("hung health_check", &["apply"], "did not finish within 1s", "v3");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    let survivors: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("31.71"))
        .collect();
    assert!(survivors.is_empty(), "the hook's processes outlived its timeout: {survivors:?}");
}
