//! imgdeploy end to end: real nginx on 127.0.0.1, real loop
//! mounts, real processes holding mounts, SIGKILL at many points.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::{image_path, ImageRef, Manifest, Timestamp, FORMAT_VERSION};
use imgdeploy_common::sign::PrivateKey;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::faults::{FaultServer, Reply};
use imgdeploy_tests::snapshot::{assert_same, snapshot};
use imgdeploy_tests::{as_reader, bin, read_as_reader, require_root, run, sh, Keys, READER_UID};

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
    d.imgdeploy(&["rollback"]).fails_with("its manifest says");
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

    // With on_drain_timeout = "fail", a holder that outlives drain_timeout
    // keeps the old slot mounted and is named.
    d.write_config("drain_timeout = \"1s\"\non_drain_timeout = \"fail\"");
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
    d.assert_refused(
        "busy standby with on_drain_timeout = fail",
        &["apply"],
        &format!("slot b ({}) is still in use by pid {} (sleep, cwd)", d.mount_point("b").display(), holder.id()),
        "v3",
    );
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

    // Regression: mount_options used to replace ro,nodev,nosuid, so adding
    // noexec silently dropped nodev,nosuid. Options only add now.
    d.write_config("mount_options = \"noexec,noatime\"\n");
    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    let flags = Deployment::mount_options(&d.mount_point("b")).expect("slot b is mounted");
    for f in ["ro", "nodev", "nosuid", "noexec", "noatime"] {
        assert!(flags.contains(&f.to_owned()), "configured mount lacks {f}: {flags:?}");
    }
    // Dropping nodev/nosuid takes the explicit key, never mount_options.
    d.write_config("mount_options = \"suid\"\n");
    d.assert_refused("suid in mount_options", &["apply"], "set `allow_devices_and_setuid = true`", "v2");
    d.write_config("allow_devices_and_setuid = true\n");
    d.publish("v2b");
    d.imgdeploy(&["apply"]).ok();
    let flags = Deployment::mount_options(&d.mount_point("a")).expect("slot a is mounted");
    assert!(flags.contains(&"ro".to_owned()), "{flags:?}");
    for f in ["nodev", "nosuid"] {
        assert!(!flags.contains(&f.to_owned()), "allow_devices_and_setuid kept {f}: {flags:?}");
    }
    d.write_config("");

    // The server goes back to serial 1 (a correctly signed, older manifest).
    for (name, bytes) in &old {
        fs::write(d.repo.join(name), bytes).unwrap();
    }
    d.assert_refused("older serial", &["apply"], "refusing to go back", "v2b");
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
    // Two readers as uid 65534, like a web server: they reach the tree
    // through the link and the mount points, never through root's rights.
    let stop = d.dir.path().join("stop-readers");
    let readers: Vec<_> = (0..2)
        .map(|_| {
            as_reader()
                .arg(bin("reader"))
                .arg(d.link.join("version"))
                .arg(&stop)
                .args(["v1", "v2"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let switches = 1000;
    for _ in 0..switches {
        d.imgdeploy(&["rollback"]).ok();
    }
    fs::write(&stop, "").unwrap();
    let (mut reads, mut errors) = (0u64, 0u64);
    for r in readers {
        let out = r.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "reader failed: {text}");
        let field = |k: &str| -> u64 {
            text.split_whitespace().find_map(|w| w.strip_prefix(k)?.parse().ok()).unwrap_or_else(|| panic!("{text}"))
        };
        reads += field("reads=");
        errors += field("errors=");
        assert_eq!(field("errors="), 0, "a reader saw errors: {text}");
    }
    eprintln!("{switches} switches, {reads} reads through the link as uid {READER_UID}, {errors} errors");
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
        let mut child = d.spawn_apply();
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
    // With an unusable local chunk index there is nothing to reuse: a plain
    // (full) download. (A missing one would be computed from the image.)
    fs::write(d.state.join("slots/a/index.idx"), b"not an index").unwrap();
    let out = d.publish_to("stable", "v2", 4_000_000, &["--level", "1", "--deltas", "0"]);
    let size = out["size"].as_u64().unwrap();
    let partial = d.state.join("slots/b/image.partial");
    let progressed = || fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) >= 1_000_000;
    d.kill_apply_after("1 MB of the image arrived", Duration::from_secs(20), progressed, Duration::ZERO);
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
            format: imgdeploy_common::manifest::ImageFormat::Squashfs,
            compression: "zstd".into(),
            verity: None,
            checkpoints: Vec::new(),
        },
        index: None,
        rollout: None,
        block_map: None,
        deltas: Vec::new(),
    };
    let bytes = m.to_bytes();
    fs::write(repo.join(format!("{channel}.json")), &bytes).unwrap();
    fs::write(repo.join(format!("{channel}.json.sig")), key.sign(&bytes)).unwrap();
}

/// A mirror that cannot sign: each signature case starts from a good server
/// (good manifest, good signature, good image) and spoils one thing; each must
/// be refused by the signature check itself, before a single image byte is
/// requested, with an error naming the fetched manifest.
#[test]
fn privileged_each_signature_case_is_refused_before_any_image_byte() {
    if !require_root("privileged_each_signature_case_is_refused_before_any_image_byte") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    d.publish("v2");
    let manifest = fs::read(d.repo.join("stable.json")).unwrap();
    let sig = fs::read(d.repo.join("stable.json.sig")).unwrap();
    let m = Manifest::parse(&manifest).unwrap();
    let image = fs::read(d.repo.join(&m.image.path)).unwrap();
    let img_route = format!("/{}", m.image.path);
    let other = PrivateKey::read(&Keys::generate().key).unwrap();
    // Still valid JSON, still channel stable, a higher serial: only the signature can tell.
    let forged = String::from_utf8(manifest.clone()).unwrap().replace("\"version\": \"v2\"", "\"version\": \"v9\"");
    assert_ne!(forged.as_bytes(), &manifest[..], "the forgery must change the manifest");
    let mut flipped = sig.clone();
    flipped[3] ^= 1;
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        (
            "a valid manifest with a flipped signature bit",
            manifest.clone(),
            flipped,
            "the signature does not verify with any of the 1 trusted key",
        ),
        (
            "an edited manifest with the original signature",
            forged.into_bytes(),
            sig.clone(),
            "the signature does not verify with any of the 1 trusted key",
        ),
        (
            "a valid manifest signed by an untrusted key",
            manifest.clone(),
            other.sign(&manifest).to_vec(),
            "the signature does not verify with any of the 1 trusted key",
        ),
        ("a truncated signature", manifest.clone(), sig[..32].to_vec(), "the signature is 32 bytes long"),
        ("an empty signature", manifest.clone(), Vec::new(), "the signature is 0 bytes long"),
    ];
    for (what, body, signature, needle) in cases {
        let faults = FaultServer::start();
        faults.route("/stable.json", Reply::Body(body));
        faults.route("/stable.json.sig", Reply::Body(signature));
        faults.route(&img_route, Reply::Body(image.clone()));
        let src = faults.url("/stable.json");
        d.assert_refused(what, &["apply", "--source", &src], &format!("manifest {src}: {needle}"), "v1");
        assert_eq!(
            faults.requests_for(&img_route),
            0,
            "{what}: the image was requested before the signature was checked"
        );
    }
    // The same server with the good signature: applied (the cases above failed for their own reason).
    let faults = FaultServer::start();
    faults.route("/stable.json", Reply::Body(manifest.clone()));
    faults.route("/stable.json.sig", Reply::Body(sig.clone()));
    faults.route(&img_route, Reply::Body(image.clone()));
    d.imgdeploy(&["apply", "--source", &faults.url("/stable.json")]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
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

    // Without static deltas: the faults below are in the image download.
    d.publish_to("stable", "v3", 0, &["--deltas", "0"]);
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
    check("tampered image in transit", &["apply", "--source", &faults.url("/stable.json")], "has sha256");
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
    // (Forged and tampered signatures: privileged_each_signature_case_is_refused_before_any_image_byte.)
    faults.route("/stable.json", Reply::Body(vec![b' '; 100_000]));
    check("huge manifest", &["apply", "--source", &faults.url("/stable.json")], "larger than the allowed");
    serving("faults", "v2");

    let cfg = fs::read_to_string(&d.config).unwrap();
    // Tampered image on the server.
    let v3_image = repo.join(&Manifest::parse(&fs::read(repo.join("stable.json")).unwrap()).unwrap().image.path);
    flip_byte(&v3_image, 100);
    check("tampered image on the server", &["apply"], "has sha256");
    flip_byte(&v3_image, 100);
    // Other channel's (correctly signed) manifest, with a serial above this
    // host's floor: only the channel check stands in its way.
    d.publish_to("beta", "beta1", 0, &["--serial", "99"]);
    check(
        "other channel",
        &["apply", "--source", &d.nginx.url("beta.json")],
        "is for channel `beta` but this host follows `stable`",
    );
    // Downgrade: the old serial-1 manifest replayed (it claims channel stable;
    // the serial floor is what refuses it).
    fs::write(repo.join("old.json"), &old_manifest).unwrap();
    fs::write(repo.join("old.json.sig"), &old_sig).unwrap();
    check("downgrade", &["apply", "--source", &d.nginx.url("old.json")], "refusing to go back");
    // Expired manifest.
    // Expiry is creation (whole seconds, at or before the build's start) plus
    // 5 s, so 5.1 s after publish returns it is past; a 1 s lifetime could
    // already be past when a loaded machine signs, and the build refuses that.
    d.publish_to("stable", "v-exp", 0, &["--expires-in", "5s"]);
    std::thread::sleep(Duration::from_millis(5100));
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
    check("misspelled config key", &["apply"], "unknown field `alow_downgrade`");
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
    let d = Deployment::new("metrics_file = \"metrics.prom\"", "");
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
    // With one version only, a tampered active image is refused at boot
    // instead of being mounted, and the error names both slots.
    run(Command::new("umount").arg(d.mount_point("a"))).ok();
    flip_byte(&d.state.join("slots/a/image.squashfs"), 9);
    d.imgdeploy(&["mount"]).fails_with("neither slot can be served: active slot a: slot a: image");
    assert!(!Deployment::is_mounted(&d.mount_point("a")), "a tampered image was mounted");
    d.assert_no_leaks();
}

/// Regression: `imgdeploy mount` at boot failed when the active slot's
/// image no longer verified, even though the other slot held a verified
/// version, and `link` then pointed at an empty directory. Now it serves the
/// other slot, records why, exits non-zero naming both, and the next apply
/// reinstalls the damaged slot.
#[test]
fn privileged_boot_falls_back_to_the_other_verified_slot() {
    if !require_root("privileged_boot_falls_back_to_the_other_verified_slot") {
        return;
    }
    let d = Deployment::new("metrics_file = \"metrics.prom\"", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // Reboot with a bit flipped in the active slot's image on disk.
    for s in ["a", "b"] {
        run(Command::new("umount").arg(d.mount_point(s)));
    }
    flip_byte(&d.state.join("slots/b/image.squashfs"), 4099);
    let r = d.imgdeploy(&["mount"]).fails_with("active slot b failed at boot (slot b: image");
    let line = r.stderr.lines().find(|l| l.starts_with("error:")).unwrap().to_owned();
    assert!(line.contains("serving slot a (serial 1) instead"), "{line}");
    assert_eq!(fs::read_link(&d.link).unwrap(), d.mount_point("a"));
    assert_eq!(d.active_version().as_deref(), Some("v1"), "the host does not serve the verified version");
    assert!(!Deployment::is_mounted(&d.mount_point("b")), "the damaged image was mounted");
    let st = d.status();
    assert_eq!(st["active"]["slot"], "a");
    assert_eq!(st["last_boot"]["fallback_from"], "b");
    assert!(st["last_boot"]["message"].as_str().unwrap().contains("sha256"), "{}", st["last_boot"]);
    let metrics = fs::read_to_string(d.dir.path().join("metrics.prom")).unwrap();
    assert!(metrics.contains("imgdeploy_last_boot_fallback{channel=\"stable\"} 1"), "{metrics}");
    assert!(metrics.contains("imgdeploy_active_serial{channel=\"stable\"} 1"), "{metrics}");
    // The next apply reinstalls serial 2 into the damaged slot.
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    d.imgdeploy(&["verify"]).ok();
    // And a boot after that is clean again.
    run(Command::new("umount").arg(d.mount_point("b"))).ok();
    d.imgdeploy(&["mount"]).ok();
    assert_eq!(d.status()["last_boot"]["fallback_from"], serde_json::Value::Null);
    d.assert_no_leaks();
}

/// Regression: the web server reads as `www-data`, and `state_dir` and
/// `mnt/` were 0700, so every read through `link` by anyone but root failed
/// with EACCES. Readers reach the tree; only root reaches images, manifests,
/// partial downloads, state and the lock.
#[test]
fn privileged_readers_reach_the_tree_but_not_the_slots() {
    if !require_root("privileged_readers_reach_the_tree_but_not_the_slots") {
        return;
    }
    let d = Deployment::new("", "");
    // A state dir left by an older release, 0700 throughout, is repaired.
    fs::create_dir_all(d.state.join("mnt/a")).unwrap();
    sh(&format!("chmod 700 '{0}' '{0}/mnt' '{0}/mnt/a'", d.state.display()));
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(read_as_reader(&d.link.join("version")).as_deref(), Ok("v1"));
    assert_eq!(read_as_reader(&d.link.join("bin/app.cgi")).as_deref(), Ok("#!/bin/sh\necho v1\n"));
    assert_eq!(read_as_reader(&d.mount_point("a").join("version")).as_deref(), Ok("v1"));
    let ls = run(as_reader().arg("ls").arg(d.link.join(".")));
    assert_eq!(ls.code, 0, "uid {READER_UID} cannot list the tree: {}", ls.stderr);
    assert!(ls.stdout.contains("version"), "{}", ls.stdout);
    for private in
        ["slots/a/image.squashfs", "slots/a/manifest.json", "slots/a/manifest.json.sig", "state.json", "lock"]
    {
        let e = read_as_reader(&d.state.join(private)).expect_err(private);
        assert!(e.contains("Permission denied"), "{private}: {e}");
    }
    // A partial download is root's alone too.
    fs::write(d.state.join("slots/b/image.partial"), b"partial").unwrap();
    assert!(read_as_reader(&d.state.join("slots/b/image.partial")).is_err());
    fs::remove_file(d.state.join("slots/b/image.partial")).unwrap();
    // `status` names the directory that would stop a web server.
    let outer = d.dir.path().join("closed");
    fs::create_dir(&outer).unwrap();
    sh(&format!("chmod 700 '{}'", outer.display()));
    d.write_config(&format!("link = \"{}/web/cgi\"", outer.display()));
    let mut cfg = fs::read_to_string(&d.config).unwrap();
    cfg = cfg.replacen(&format!("link = \"{}\"\n", d.link.display()), "", 1);
    fs::write(&d.config, cfg).unwrap();
    d.publish("v2");
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(
        out.stderr.contains(&format!("{} is mode 700; run `chmod o+x {}`", outer.display(), outer.display())),
        "{}",
        out.stderr
    );
}

/// Regression: a process that stayed inside the old version blocked every
/// later apply for good. After drain_timeout the old version is detached:
/// the update goes on, the process keeps a consistent view of the old
/// version even when its slot receives a newer image, status and metrics
/// name it, and nothing is left once it exits.
#[test]
fn privileged_lingering_user_is_detached_and_keeps_the_old_version() {
    if !require_root("privileged_lingering_user_is_detached_and_keeps_the_old_version") {
        return;
    }
    let d = Deployment::new("metrics_file = \"metrics.prom\"", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // An unprivileged process inside v1 (a daemon started from a CGI), which
    // reads its tree again after two updates have gone by.
    let seen = d.dir.path().join("seen");
    fs::write(&seen, "").unwrap();
    sh(&format!("chown {READER_UID} '{}'", seen.display()));
    let go = d.dir.path().join("go");
    let mut holder = as_reader()
        .args(["sh", "-c", "while [ ! -e \"$1\" ]; do sleep 0.1; done; cat version bin/app.cgi > \"$2\""])
        .arg("holder")
        .arg(&go)
        .arg(&seen)
        .current_dir(&d.link)
        .spawn()
        .unwrap();
    d.publish("v2");
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(
        out.stdout.contains(&format!("old version detached, in use by pid {} (sh, cwd)", holder.id())),
        "{}",
        out.stdout
    );
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    assert!(!Deployment::is_mounted(&d.mount_point("a")), "slot a still mounted after the detach");
    let st = d.status();
    let det = &st["detached"][0];
    assert_eq!((det["slot"].as_str(), det["serial"].as_u64()), (Some("a"), Some(1)), "{st}");
    assert_eq!(det["users"][0]["pid"].as_u64(), Some(holder.id() as u64), "{st}");
    let metrics = fs::read_to_string(d.dir.path().join("metrics.prom")).unwrap();
    assert!(metrics.contains("imgdeploy_detached_versions{channel=\"stable\"} 1"), "{metrics}");
    // The shell and, at times, its `sleep` child.
    assert!(!metrics.contains("imgdeploy_detached_users{channel=\"stable\"} 0"), "{metrics}");
    // The next update needs slot a, where the holder still is: not blocked.
    d.publish("v3");
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    assert_eq!(fs::read_link(&d.link).unwrap(), d.mount_point("a"));
    // The holder still sees v1, whole: the new image went into a new file.
    fs::write(&go, "").unwrap();
    assert!(holder.wait().unwrap().success());
    assert_eq!(fs::read_to_string(&seen).unwrap(), "v1#!/bin/sh\necho v1\n");
    // Once it exited, the detached version and its loop device are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.status()["detached"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "detached version outlived its last user: {}", d.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    d.assert_no_leaks();
}

/// Regression: a refused update cleared the standby's manifest before the
/// new image was verified, so `rollback` then said there was nothing to roll
/// back to. The previous version stays installed until a verified image
/// replaces it.
#[test]
fn privileged_refused_update_keeps_the_rollback_target() {
    if !require_root("privileged_refused_update_keeps_the_rollback_target") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    d.publish("v2");
    d.imgdeploy(&["apply"]).ok();
    // v3's image is tampered with on the server: refused after download.
    // (Without static deltas: with one, the image file is never fetched.)
    let v3 = d.publish_to("stable", "v3", 0, &["--deltas", "0"]);
    flip_byte(Path::new(v3["image"].as_str().unwrap()), 777);
    d.assert_refused("tampered image", &["apply"], "sha256", "v2");
    assert_eq!(d.status()["standby"]["serial"], 1, "the refused update cost the rollback target");
    // A download cut short by the server, too.
    let v4 = d.publish_to("stable", "v4", 0, &["--deltas", "0"]);
    let image = Path::new(v4["image"].as_str().unwrap()).to_owned();
    let full = fs::read(&image).unwrap();
    fs::write(&image, &full[..full.len() / 2]).unwrap();
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0, "a truncated image was accepted: {}", r.stderr);
    assert_eq!(d.status()["standby"]["serial"], 1, "the failed download cost the rollback target");
    d.imgdeploy(&["rollback"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    fs::write(&image, &full).unwrap();
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v4"));
    d.assert_no_leaks();
}

/// Regression: boot mode was chosen because the process was PID 1, so
/// `imgdeploy status` as a container's entrypoint mounted /proc and /dev and
/// powered off. Only `/init` (or the hidden `boot` command) boots.
#[test]
fn privileged_pid_1_alone_is_not_boot_mode() {
    if !require_root("privileged_pid_1_alone_is_not_boot_mode") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let r = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private"])
        .arg(bin("imgdeploy"))
        .arg("-c")
        .arg(&d.config)
        .args(["status", "--json"]));
    assert_eq!(r.code, 0, "status as PID 1 failed: {}", r.stderr);
    assert!(!r.stderr.contains("netboot"), "boot mode ran: {}", r.stderr);
    assert_eq!(r.json()["active"]["serial"], 1);
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

/// A private origin that wants a token in the query string gets it on every
/// request: manifest, signature, chunk index and image (the fault server
/// answers 404 to any path without it).
#[test]
fn privileged_a_query_string_reaches_every_request() {
    if !require_root("privileged_a_query_string_reaches_every_request") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let faults = FaultServer::start();
    let serve_all = || {
        for entry in imgdeploy_tests::files_under(&d.repo) {
            let rel = entry.strip_prefix(&d.repo).unwrap().to_str().unwrap().to_owned();
            faults.route(&format!("/{rel}?token=s3cr3t"), Reply::Body(fs::read(&entry).unwrap()));
        }
    };
    let with_token = |rel: &str| faults.requests_for(&format!("/{rel}?token=s3cr3t"));
    // v2 through its static delta.
    d.publish("v2");
    serve_all();
    let r = d.imgdeploy(&["apply", "--source", &faults.url("/stable.json?token=s3cr3t"), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["download"]["mode"], "static-delta");
    let m = Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    assert!(with_token(&m.deltas[0].path) > 0, "the static delta was not requested with the token");
    // v3 through the image itself.
    d.publish_to("stable", "v3", 0, &["--deltas", "0"]);
    serve_all();
    let r = d.imgdeploy(&["apply", "--source", &faults.url("/stable.json?token=s3cr3t"), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v3"));
    let m = Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    assert!(with_token(&m.image.path) > 0, "the image was not requested with the token");
    assert!(with_token(&m.index.as_ref().unwrap().path) > 0, "the chunk index was not requested with the token");
    let sig = format!("sigs/{}.sig", Sha256Digest::of_bytes(&fs::read(d.repo.join("stable.json")).unwrap()));
    assert!(with_token(&sig) > 0, "the signature was not requested with the token");
}
