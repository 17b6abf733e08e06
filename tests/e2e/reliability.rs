//! Reliability and security: more faults from a misbehaving
//! server, a crash loop of SIGKILLs in a row, key rotation and bad keys.
//! Figures printed here (`RELIABILITY` lines) are collected into
//! RELIABILITY.md by `scripts/reliability.sh`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use imgdeploy_common::manifest::Manifest;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::faults::{FaultServer, Reply};
use imgdeploy_tests::{bin, require_root, run, Keys};

#[test]
fn privileged_more_server_faults() {
    if !require_root("privileged_more_server_faults") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // With an unusable local index and no static delta, the next image is
    // a plain (resumable) full download.
    fs::write(d.state.join("slots/a/index.idx"), b"not an index").unwrap();
    d.publish_to("stable", "v2", 2_000_000, &["--level", "1", "--deltas", "0"]);
    let manifest = fs::read(d.repo.join("stable.json")).unwrap();
    let m = Manifest::parse(&manifest).unwrap();
    let image = fs::read(d.repo.join(&m.image.path)).unwrap();
    let f = FaultServer::start();
    f.route("/stable.json", Reply::Body(manifest.clone()));
    f.route("/stable.json.sig", Reply::Body(fs::read(d.repo.join("stable.json.sig")).unwrap()));
    let img = format!("/{}", m.image.path);
    let src = f.url("/stable.json");
    let mut cases = 0;
    let mut check = |what: &str, needle: &str| {
        d.assert_refused(what, &["apply", "--source", &src], needle, "v1");
        cases += 1;
    };
    f.route(&img, Reply::RetryAfter(503, 120));
    check("503 with Retry-After", "it asks to retry after 120 s");
    f.route(&img, Reply::RetryAfter(429, 30));
    check("429 with Retry-After", "rate limiting");
    f.route(&img, Reply::Endless);
    check("endless body", "longer than the");
    f.route("/stable.json", Reply::Endless);
    check("endless manifest", "larger than the allowed");
    f.route("/stable.json", Reply::Body(manifest.clone()));
    // Leave a partial download, then answer the resume with the wrong range.
    let cfg = fs::read_to_string(&d.config).unwrap();
    fs::write(&d.config, format!("{cfg}download_timeout = \"2s\"\n")).unwrap();
    f.route(&img, Reply::Stall(image.clone(), image.len() / 2));
    check("stall to leave a partial", "rerun to resume");
    fs::write(&d.config, &cfg).unwrap();
    f.route(&img, Reply::WrongRange(image.clone()));
    check("206 with the wrong range", "but the server answered with range");
    // The server behaves again: the partial is resumed and the apply completes.
    f.route(&img, Reply::Body(image.clone()));
    let ok = d.imgdeploy(&["apply", "--source", &src, "--json"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    eprintln!("RELIABILITY network-faults cases={cases} failures=0");
}

/// SIGKILL `apply` while it runs, N times in a row (100; IMGDEPLOY_CRASH_KILLS
/// overrides), a new version published before every run so each kill lands in
/// a real update (download, delta, verify, mount or switch). After every kill
/// `link` must exist, resolve to a mounted slot readable by an unprivileged
/// user, serve either the version from before this run or the new one, and
/// nothing may leak; then one apply completes.
#[test]
fn privileged_crash_loop() {
    if !require_root("privileged_crash_loop") {
        return;
    }
    let kills: usize = std::env::var("IMGDEPLOY_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let d = Deployment::new("", "limit_rate 8m;");
    d.publish("v0");
    d.imgdeploy(&["apply"]).ok();
    // How long an update takes here: kills are spread over the fastest
    // calibration run, so a run quicker than the slowest one is still hit
    // while it works. The span then tracks the real duration (timing drifts
    // on a busy CI box): a kill that finds its apply done narrows it by 10%,
    // a kill that hits widens it by 1%, which settles near one miss in
    // eleven, so the late steps (mount, switch, cleanup) are hit as well.
    let mut span = Duration::MAX;
    for label in ["m1", "m2", "m3"] {
        d.publish_to("stable", label, 800_000, &["--level", "1"]);
        let t = Instant::now();
        d.imgdeploy(&["apply"]).ok();
        span = span.min(t.elapsed());
    }
    let mut span_ms = span.as_millis().max(20) as u64;
    let calibrated_ms = span_ms;
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut broken = Vec::new();
    let mut live = 0;
    let mut served = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..kills {
        let before = d.active_version().expect("a version is served before every run");
        let label = format!("c{i}");
        d.publish_to("stable", &label, 800_000, &["--level", "1"]);
        let mut child = d.spawn_apply();
        std::thread::sleep(Duration::from_millis(rnd(span_ms)));
        if child.try_wait().unwrap().is_none() {
            live += 1;
            span_ms += span_ms / 100 + 1;
        } else {
            span_ms = (span_ms * 9 / 10).max(20);
        }
        let _ = child.kill();
        child.wait().unwrap();
        let check = std::panic::catch_unwind(|| {
            assert!(fs::symlink_metadata(&d.link).is_ok(), "link is missing");
            d.assert_link_sound();
            d.assert_no_leaks();
        });
        let now = d.active_version();
        match (&check, now.as_deref()) {
            (Ok(()), Some(v)) if v == before => *served.entry("previous").or_default() += 1,
            (Ok(()), Some(v)) if v == label => *served.entry("new").or_default() += 1,
            (Ok(()), v) => broken.push(format!("kill {i}: serves {v:?}, neither {before} nor {label}")),
            (Err(e), _) => broken.push(format!(
                "kill {i}: {}",
                e.downcast_ref::<String>().map(String::as_str).or(e.downcast_ref::<&str>().copied()).unwrap_or("?")
            )),
        }
    }
    let last = format!("c{}", kills - 1);
    let t = Instant::now();
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some(last.as_str()));
    eprintln!(
        "RELIABILITY crash-loop kills={kills} kills_while_running={live} served_previous={} served_new={} broken_states={} update_ms={calibrated_ms} span_ms={span_ms} final_apply_ms={}",
        served.get("previous").unwrap_or(&0),
        served.get("new").unwrap_or(&0),
        broken.len(),
        t.elapsed().as_millis()
    );
    assert!(broken.is_empty(), "{} of {kills} kills left a broken state:\n{}", broken.len(), broken.join("\n"));
    assert!(live * 4 >= kills * 3, "only {live} of {kills} kills hit a running apply; the test would prove little");
}

#[test]
fn privileged_key_rotation_and_bad_keys() {
    if !require_root("privileged_key_rotation_and_bad_keys") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let old_manifest =
        (fs::read(d.repo.join("stable.json")).unwrap(), fs::read(d.repo.join("stable.json.sig")).unwrap());
    // Rotation: the new key is trusted beside the old one, then publishing switches to it.
    let new = Keys::generate();
    let cfg = fs::read_to_string(&d.config).unwrap();
    let both = cfg.replace(
        &format!("trusted_keys = [\"{}\"]", d.keys.public.display()),
        &format!("trusted_keys = [\"{}\", \"{}\"]", d.keys.public.display(), new.public.display()),
    );
    fs::write(&d.config, &both).unwrap();
    let tree = d.dir.path().join("tree-rot");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("version"), "v2").unwrap();
    // The first publish with the new key continues the serial of a
    // manifest the old key signed: only when told to trust the old key.
    let build = |trust: bool| {
        let mut c = Command::new(bin("imgbuild"));
        c.arg("build").arg(&tree).arg("--key").arg(&new.key).args(["--channel", "stable", "--version", "v2"]);
        c.arg("--repo").arg(&d.repo);
        if trust {
            c.arg("--trust").arg(&d.keys.public);
        }
        run(&mut c)
    };
    build(false).fails_with("does not verify with the signing key");
    let r = build(true);
    assert_eq!(r.code, 0, "{}", r.stderr);
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // The old key is retired: only the new one is trusted, and slot b still verifies.
    let only_new = cfg.replace(&d.keys.public.display().to_string(), &new.public.display().to_string());
    fs::write(&d.config, &only_new).unwrap();
    d.imgdeploy(&["apply"]).ok();
    // A replay of a manifest signed with the retired key is refused.
    let replay = d.repo.join("replay.json");
    fs::write(&replay, &old_manifest.0).unwrap();
    fs::write(d.repo.join("replay.json.sig"), &old_manifest.1).unwrap();
    let r = d.imgdeploy(&["apply", "--source", replay.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("does not verify with any of the 1 trusted key"), "{}", r.stderr);
    // A malformed PEM among the trusted keys is named.
    let bad = d.dir.path().join("bad.pub");
    fs::write(&bad, "-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n").unwrap();
    fs::write(&d.config, only_new.replace(&new.public.display().to_string(), &bad.display().to_string())).unwrap();
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("bad.pub") && r.stderr.contains("is not an Ed25519 public key"), "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // A private key readable by others: imgbuild warns and names the fix.
    fs::set_permissions(&new.key, fs::Permissions::from_mode(0o644)).unwrap();
    let r = run(Command::new(bin("imgbuild"))
        .arg("build")
        .arg(&tree)
        .arg("--key")
        .arg(&new.key)
        .args(["--channel", "stable"])
        .arg("--repo")
        .arg(&d.repo));
    assert_eq!(r.code, 0);
    assert!(r.stderr.contains("is readable by other users") && r.stderr.contains("chmod 600"), "{}", r.stderr);
    eprintln!("RELIABILITY keys cases=5 failures=0");
}
