//! Attacks on the trust model by someone who controls the mirror, the
//! bucket or the CDN but not the signing key. Each test performs the attack
//! end to end and asserts that it fails.

use std::fs;

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::{require_root, run_bin, sh};

/// The channel's manifest and signature as the server holds them now.
fn saved(d: &Deployment) -> Vec<(String, Vec<u8>)> {
    ["stable.json", "stable.json.sig"].iter().map(|f| (f.to_string(), fs::read(d.repo.join(f)).unwrap())).collect()
}

fn serve(d: &Deployment, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        fs::write(d.repo.join(name), bytes).unwrap();
    }
}

/// Regression (replay after a reused image): X as serial 1, Y as serial 2,
/// X again as serial 3 (a reproducible rebuild: same sha256, which the
/// standby slot still holds). The host switched to X but kept serial 1 as
/// its record, so the saved, withdrawn serial-2 manifest installed Y again.
#[test]
fn privileged_replay_after_a_reused_image_is_refused() {
    if !require_root("privileged_replay_after_a_reused_image_is_refused") {
        return;
    }
    let d = Deployment::new("", "");
    let x = d.dir.path().join("tree-x");
    fs::create_dir_all(&x).unwrap();
    fs::write(x.join("data"), "x").unwrap();
    let y = d.dir.path().join("tree-y");
    fs::create_dir_all(&y).unwrap();
    fs::write(y.join("data"), "y").unwrap();
    // Fixed mtimes: the rebuild of X must give the very same image bytes.
    let publish = |tree: &std::path::Path, label: &str| {
        fs::write(tree.join("version"), label).unwrap();
        sh(&format!("find '{}' -exec touch -h -d @1700000000 {{}} +", tree.display()));
        imgdeploy_tests::build_image(tree, &d.keys, "stable", &d.repo, &["--version", label])
    };
    let x1 = publish(&x, "X");
    d.imgdeploy(&["apply"]).ok();
    publish(&y, "Y");
    d.imgdeploy(&["apply"]).ok();
    let withdrawn = saved(&d);
    let x3 = publish(&x, "X");
    assert_eq!(x1["sha256"], x3["sha256"], "the rebuild of X is not reproducible; the test needs the same image");
    assert_eq!(x3["serial"], 3);
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("X"));
    assert_eq!(d.status()["active"]["serial"], 3, "the host does not record the serial it now runs");
    // The mirror serves the saved serial-2 manifest: Y must not come back.
    serve(&d, &withdrawn);
    d.assert_refused("replayed serial 2 after serial 3", &["apply"], "refusing to go back", "X");
    assert_eq!(d.status()["floor"]["stable"]["serial"], 3);
}

/// A re-signed manifest of the image already running (rollout widened,
/// promotion) raises the floor too; so does a manifest whose wave does not
/// include this host; and the floor does not depend on `link` existing.
#[test]
fn privileged_every_verified_serial_raises_the_floor() {
    if !require_root("privileged_every_verified_serial_raises_the_floor") {
        return;
    }
    let d = Deployment::new("machine_id = \"host-that-is-never-in-a-0-percent-wave\"", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let serial1 = saved(&d);
    // Same image, re-signed as serial 2.
    imgbuild(&d, &["rollout", "--channel", "stable", "--percent", "100"]).ok();
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(out.stdout.contains("up to date"), "{}", out.stdout);
    let st = d.status();
    assert_eq!(st["active"]["serial"], 2, "re-signed serial not recorded: {st}");
    assert_eq!(st["floor"]["stable"]["serial"], 2, "{st}");
    let serial2 = saved(&d);
    serve(&d, &serial1);
    d.assert_refused("replayed serial 1 after a re-signed serial 2", &["apply"], "refusing to go back", "v1");
    // The publisher's repository is back to its real state before the next build.
    serve(&d, &serial2);

    // A new image rolling out to 0%: this host is not in the wave, but it has seen serial 3.
    d.publish_to("stable", "v3", 0, &["--rollout", "0"]);
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(out.stdout.contains("not in the wave"), "{}", out.stdout);
    assert_eq!(d.status()["floor"]["stable"]["serial"], 3);
    serve(&d, &serial1);
    d.assert_refused("replayed serial 1 while not in the wave", &["apply"], "refusing to go back", "v1");

    // Without a link (removed by hand, or on a tmpfs after a reboot) the floor still holds.
    fs::remove_file(&d.link).unwrap();
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0, "a replayed serial 1 was accepted without a link: {}", r.stdout);
    assert!(r.stderr.contains("refusing to go back"), "{}", r.stderr);
}

fn imgbuild(d: &Deployment, args: &[&str]) -> imgdeploy_tests::Run {
    let mut all: Vec<&str> = args.to_vec();
    let repo = d.repo.to_str().unwrap().to_owned();
    let key = d.keys.key.to_str().unwrap().to_owned();
    all.extend_from_slice(&["--repo", &repo, "--key", &key]);
    run_bin("imgbuild", &all)
}

fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Regression: whoever could write to the bucket (the CI examples download
/// the repository before promoting) chose what CI signed. `promote`,
/// `rollout` and `build` now trust the repository's manifests only when
/// their signatures verify with the signing key, and its images only when
/// they hash to what those manifests sign. Needs no root.
#[test]
fn ci_never_re_signs_what_the_bucket_changed() {
    let d = Deployment::new("", "");
    let v1 = d.publish_to("beta", "v1", 0, &[]);
    let other = d.publish_to("scratch", "other", 0, &[]);
    let beta = d.repo.join("beta.json");
    let good = fs::read(&beta).unwrap();
    // The bucket points beta at another image (the signature no longer matches).
    edit_json(&beta, |m| {
        m["image"]["sha256"] = other["sha256"].clone();
        m["image"]["path"] = serde_json::Value::String(
            std::path::Path::new(other["image"].as_str().unwrap())
                .strip_prefix(&d.repo)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
    });
    imgbuild(&d, &["promote", "--from", "beta", "--to", "stable"])
        .fails_with(&format!("{} does not verify with the signing key", beta.display()));
    assert!(!d.repo.join("stable.json").exists(), "promote signed a manifest the bucket forged");
    imgbuild(&d, &["rollout", "--channel", "beta", "--percent", "50"])
        .fails_with(&format!("{} does not verify with the signing key", beta.display()));
    // The manifest is genuine, but the bucket swapped the image's bytes.
    fs::write(&beta, &good).unwrap();
    let image = std::path::Path::new(v1["image"].as_str().unwrap()).to_owned();
    let bytes = fs::read(&image).unwrap();
    fs::write(&image, fs::read(other["image"].as_str().unwrap()).unwrap()).unwrap();
    imgbuild(&d, &["promote", "--from", "beta", "--to", "stable"])
        .fails_with(&format!("{} does not match the manifest that signs it", image.display()));
    assert!(!d.repo.join("stable.json").exists(), "promote signed an image the bucket swapped");
    fs::write(&image, bytes).unwrap();
    // CI copies the repository without its images (examples/ci): the signed
    // sha256 is what gets re-signed.
    let images = d.repo.join("images");
    fs::rename(&images, d.dir.path().join("images.away")).unwrap();
    imgbuild(&d, &["promote", "--from", "beta", "--to", "stable"]).ok();
    fs::rename(d.dir.path().join("images.away"), &images).unwrap();
    let stable: serde_json::Value = serde_json::from_slice(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    assert_eq!(stable["image"]["sha256"], v1["sha256"]);
    // A forged serial near the top would make the next build wrap around.
    let stable = d.repo.join("stable.json");
    edit_json(&stable, |m| m["serial"] = serde_json::json!(u64::MAX - 1));
    let tree = d.dir.path().join("tree-stable-v1");
    let r = imgbuild(&d, &["build", tree.to_str().unwrap(), "--channel", "stable"]);
    r.fails_with(&format!("{} does not verify with the signing key", stable.display()));
}

/// A genuinely signed serial at the top of the range is the end of the
/// channel: the next publish says so instead of wrapping to 0.
#[test]
fn the_serial_never_wraps() {
    let d = Deployment::new("", "");
    d.publish_to("stable", "v1", 0, &["--serial", &u64::MAX.to_string()]);
    let tree = d.dir.path().join("tree-stable-v1");
    let r = imgbuild(&d, &["build", tree.to_str().unwrap(), "--channel", "stable"]);
    r.fails_with("has reached the largest serial");
    imgbuild(&d, &["rollout", "--channel", "stable", "--percent", "50"]).fails_with("has reached the largest serial");
}

/// Regression (key rotation lockout): once the old key left
/// `trusted_keys`, apply failed on the active slot's stored manifest (and
/// its advice, `imgdeploy apply`, failed the same way), so a host that was
/// offline during the rotation could never update. A manifest from the new
/// key installs; the slot signed by the retired key is no longer trusted
/// for anything (no floor, no rollback target, no reuse).
#[test]
fn privileged_a_host_that_missed_the_rotation_still_updates() {
    if !require_root("privileged_a_host_that_missed_the_rotation_still_updates") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // The fleet rotated while this host was offline: it comes back trusting only the new key.
    let new = imgdeploy_tests::Keys::generate();
    let cfg = fs::read_to_string(&d.config).unwrap();
    fs::write(&d.config, cfg.replace(&d.keys.public.display().to_string(), &new.public.display().to_string())).unwrap();
    let tree = d.dir.path().join("tree-rotated");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("version"), "v2").unwrap();
    let trust_old = d.keys.public.to_str().unwrap().to_owned();
    imgdeploy_tests::build_image(&tree, &new, "stable", &d.repo, &["--version", "v2", "--trust", &trust_old]);
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(out.stdout.contains("switched to serial 2"), "{}", out.stdout);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // The retired key's version is not a rollback target.
    d.assert_refused("rollback to a slot signed by a retired key", &["rollback"], "does not verify", "v2");
}

/// Regression: two publishes to one repository at once both read serial N
/// and both signed N+1 for different images; hosts that took the first
/// then refused the second as a reused serial. Publishes now take a lock
/// on the repository, so concurrent ones get distinct serials. Needs no root.
#[test]
fn concurrent_publishes_never_share_a_serial() {
    let d = Deployment::new("", "");
    let n = 6;
    let children: Vec<_> = (0..n)
        .map(|i| {
            let tree = d.dir.path().join(format!("tree-{i}"));
            fs::create_dir_all(&tree).unwrap();
            fs::write(tree.join("data"), imgdeploy_tests::noise(200_000, i)).unwrap();
            std::process::Command::new(imgdeploy_tests::bin("imgbuild"))
                .arg("build")
                .arg(&tree)
                .arg("--key")
                .arg(&d.keys.key)
                .args(["--channel", "stable", "--json", "--repo"])
                .arg(&d.repo)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut serials: Vec<u64> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "a publish failed: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["serial"].as_u64().unwrap()
        })
        .collect();
    serials.sort();
    assert_eq!(serials, (1..=n).collect::<Vec<_>>(), "concurrent publishes shared or skipped serials");
    let published: serde_json::Value = serde_json::from_slice(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    assert_eq!(published["serial"], n, "the channel does not end at the last serial signed");
}

/// Regression: SOURCE_DATE_EPOCH sets the signed creation time, so
/// rebuilding an old commit signed a manifest that was already expired
/// (build only warned; rollout and promote said nothing), and deployers
/// refused it later. Signing one is now an error. Needs no root.
#[test]
fn an_already_expired_manifest_is_never_signed() {
    let d = Deployment::new("", "");
    d.publish_to("beta", "v1", 0, &[]);
    let tree = d.dir.path().join("tree-beta-v1");
    let old = |args: &[&str]| {
        let mut c = std::process::Command::new(imgdeploy_tests::bin("imgbuild"));
        c.env("SOURCE_DATE_EPOCH", "1500000000").args(args);
        c.arg("--repo").arg(&d.repo).arg("--key").arg(&d.keys.key);
        imgdeploy_tests::run(&mut c)
    };
    old(&["build", tree.to_str().unwrap(), "--channel", "beta"])
        .fails_with("refusing to sign a manifest for `beta` that expires at 2017-07-21T02:40:00Z");
    old(&["rollout", "--channel", "beta", "--percent", "50"]).fails_with("refusing to sign a manifest for `beta`");
    old(&["promote", "--from", "beta", "--to", "stable"]).fails_with("refusing to sign a manifest for `stable`");
    assert!(!d.repo.join("stable.json").exists());
    let beta: serde_json::Value = serde_json::from_slice(&fs::read(d.repo.join("beta.json")).unwrap()).unwrap();
    assert_eq!(beta["serial"], 1, "an expired manifest replaced the published one");
    // An explicit validity reaching past now is a deliberate, working choice.
    old(&["build", tree.to_str().unwrap(), "--channel", "beta", "--expires-in", "36500d"]).ok();
}

/// Regression: process names from /proc/PID/comm (which any local user
/// sets) reached the terminal raw, escape sequences included. They are
/// printed escaped.
#[test]
fn privileged_untrusted_process_names_are_escaped() {
    if !require_root("privileged_untrusted_process_names_are_escaped") {
        return;
    }
    let d = Deployment::new("drain_timeout = \"1s\"\non_drain_timeout = \"fail\"", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    // A process inside v1 that renamed itself with a terminal escape; it
    // keeps the old slot mounted after the switch to v2.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // Best effort: it may be gone already.
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _evil = KillOnDrop(
        imgdeploy_tests::as_reader()
            .args(["sh", "-c", "printf '\\033]0;pwned\\007x' > /proc/$$/comm; while :; do sleep 1; done"])
            .current_dir(&d.link)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    d.publish("v2");
    std::thread::sleep(std::time::Duration::from_millis(300));
    for args in [&["apply"][..], &["status"], &["status", "--json"], &["drain", "--timeout", "0s"]] {
        let r = d.imgdeploy(args);
        for (what, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{7}'),
                "{args:?}: raw control bytes on {what}: {text:?}"
            );
        }
        assert!(r.stdout.contains("pwned") || r.stderr.contains("pwned"), "{args:?}: the holder is not named: {r:?}");
    }
}

/// Regression: an existing `images/<sha256>.squashfs` or
/// `indexes/<sha256>.idx` was kept on a rebuild without looking at it, so
/// whoever replaced it in the bucket had the next publish sign a manifest
/// for bytes that are not the image. A stored file is kept only when its
/// content matches its name. Needs no root.
#[test]
fn the_repository_does_not_trust_file_names() {
    let d = Deployment::new("", "");
    let tree = d.dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("data"), imgdeploy_tests::noise(100_000, 5)).unwrap();
    sh(&format!("find '{}' -exec touch -h -d @1700000000 {{}} +", tree.display()));
    let first = imgdeploy_tests::build_image(&tree, &d.keys, "stable", &d.repo, &[]);
    let image = std::path::PathBuf::from(first["image"].as_str().unwrap());
    let good = fs::read(&image).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    let index = d.repo.join(m["index"]["path"].as_str().unwrap());
    let good_index = fs::read(&index).unwrap();
    fs::write(&image, b"not the image").unwrap();
    fs::write(&index, b"not the index").unwrap();
    let second = imgdeploy_tests::build_image(&tree, &d.keys, "stable", &d.repo, &[]);
    assert_eq!(first["sha256"], second["sha256"]);
    assert_eq!(fs::read(&image).unwrap(), good, "the rebuild kept a replaced image under its name");
    assert_eq!(fs::read(&index).unwrap(), good_index, "the rebuild kept a replaced chunk index under its name");
}

/// Regression: the files root acts on were not checked. A config file, a
/// trusted key file or a hook program that another user can change, or a
/// directory above one of them (or above state_dir or link) that another
/// user can write, would let that user choose the source, the keys or the
/// program root runs. Each is refused, naming the file and the fix.
#[test]
fn privileged_files_root_acts_on_must_be_roots() {
    if !require_root("privileged_files_root_acts_on_must_be_roots") {
        return;
    }
    let d = Deployment::new("", "");
    let hook = d.dir.path().join("hooks/check.sh");
    fs::create_dir_all(hook.parent().unwrap()).unwrap();
    fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    sh(&format!("chmod 755 '{}'", hook.display()));
    d.write_config(&format!("health_check = \"{}\"", hook.display()));
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    d.publish("v2");
    let chmod = |mode: &str, p: &std::path::Path| sh(&format!("chmod {mode} '{}'", p.display()));
    let cases: Vec<(&str, std::path::PathBuf, &str, String)> = vec![
        (
            "config file writable by others",
            d.config.clone(),
            "666",
            format!("config file {} is writable by other users (mode 666)", d.config.display()),
        ),
        (
            "key file writable by others",
            d.keys.public.clone(),
            "666",
            format!("trusted key file {} is writable by other users", d.keys.public.display()),
        ),
        (
            "hook program writable by others",
            hook.clone(),
            "777",
            format!("refusing to run health_check: hook program {} is writable by other users", hook.display()),
        ),
        (
            "directory above the hook writable by others",
            hook.parent().unwrap().to_owned(),
            "777",
            format!(
                "hook program: the directory {} above it is writable by other users",
                hook.parent().unwrap().display()
            ),
        ),
        (
            "directory above the key writable by others",
            d.keys.dir.path().to_owned(),
            "777",
            format!("the directory {} above it is writable by other users", d.keys.dir.path().display()),
        ),
    ];
    for (what, path, mode, needle) in &cases {
        let before = fs::metadata(path).unwrap();
        chmod(mode, path);
        d.assert_refused(what, &["apply"], needle, "v1");
        use std::os::unix::fs::PermissionsExt;
        chmod(&format!("{:o}", before.permissions().mode() & 0o7777), path);
    }
    // A directory above state_dir that others can write: refused too.
    let outer = d.dir.path().join("open");
    fs::create_dir(&outer).unwrap();
    chmod("777", &outer);
    d.write_config(&format!("state_dir = \"{}/state\"", outer.display()));
    let mut cfg = fs::read_to_string(&d.config).unwrap();
    cfg = cfg.replacen(&format!("state_dir = \"{}\"\n", d.state.display()), "", 1);
    fs::write(&d.config, cfg).unwrap();
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0, "a state_dir below a world-writable directory was used");
    assert!(
        r.stderr.contains(&format!("state_dir: the directory {} above it is writable by other users", outer.display())),
        "{}",
        r.stderr
    );
    assert_eq!(d.active_version().as_deref(), Some("v1"));
}

/// Freeze: a mirror can keep serving the last manifest a host saw until it
/// expires. `imgbuild refresh` re-signs the current manifest with a new
/// expiry (same image, same rollout, next serial) so expiries can be short;
/// hosts take it as up to date and raise their floor, so the mirror cannot
/// go back to the older signature either.
#[test]
fn privileged_refresh_moves_the_expiry_and_the_floor() {
    if !require_root("privileged_refresh_moves_the_expiry_and_the_floor") {
        return;
    }
    let d = Deployment::new("machine_id = \"refresh-test-host\"", "");
    let v1 = d.publish_to("stable", "v1", 0, &["--expires-in", "1h"]);
    d.imgdeploy(&["apply"]).ok();
    let old = saved(&d);
    let r = imgbuild(&d, &["refresh", "--channel", "stable", "--expires-in", "3d", "--json"]).ok().json();
    assert_eq!((r["serial"].as_u64(), r["version"].as_str()), (Some(2), Some("v1")), "{r}");
    assert_eq!(r["image"]["sha256"], v1["sha256"], "refresh changed the image");
    let refreshed = saved(&d);
    let created = serde_json::from_value::<imgdeploy_common::manifest::Timestamp>(r["created"].clone()).unwrap();
    let expires = serde_json::from_value::<imgdeploy_common::manifest::Timestamp>(r["expires"].clone()).unwrap();
    assert_eq!(expires.0 - created.0, 3 * 86400);
    let out = d.imgdeploy(&["apply"]).ok();
    assert!(out.stdout.contains("up to date"), "{}", out.stdout);
    assert_eq!(d.status()["floor"]["stable"]["serial"], 2);
    serve(&d, &old);
    d.assert_refused("the mirror goes back to the pre-refresh manifest", &["apply"], "refusing to go back", "v1");
    // A staged rollout keeps its percentage through a refresh.
    serve(&d, &refreshed);
    imgbuild(&d, &["rollout", "--channel", "stable", "--percent", "30"]).ok();
    let r = imgbuild(&d, &["refresh", "--channel", "stable", "--json"]).ok().json();
    assert_eq!((r["serial"].as_u64(), r["rollout"].as_u64()), (Some(4), Some(30)), "{r}");
    let expires = serde_json::from_value::<imgdeploy_common::manifest::Timestamp>(r["expires"].clone()).unwrap();
    let created = serde_json::from_value::<imgdeploy_common::manifest::Timestamp>(r["created"].clone()).unwrap();
    assert_eq!(expires.0 - created.0, 7 * 86400, "the default expiry is 7 days");
}

/// A CDN caches `stable.json` and `stable.json.sig` as two
/// objects, so after a publish it can serve the new manifest with the old
/// signature. The signature named by the manifest's sha256
/// (`sigs/<sha256>.sig`) is immutable, so the pair a host fetches always
/// matches; a repository without `sigs/` still works through `.json.sig`.
#[test]
fn privileged_a_cached_old_signature_never_pairs_with_a_new_manifest() {
    if !require_root("privileged_a_cached_old_signature_never_pairs_with_a_new_manifest") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish("v1");
    d.imgdeploy(&["apply"]).ok();
    let stale_sig = fs::read(d.repo.join("stable.json.sig")).unwrap();
    d.publish("v2");
    let manifest = fs::read(d.repo.join("stable.json")).unwrap();
    let by_digest = d.repo.join(format!("sigs/{}.sig", Sha256Digest::of_bytes(&manifest)));
    assert_eq!(fs::read(&by_digest).unwrap(), fs::read(d.repo.join("stable.json.sig")).unwrap());
    // The CDN still has the old signature object.
    fs::write(d.repo.join("stable.json.sig"), &stale_sig).unwrap();
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "a new manifest with a cached old .sig was not applied:\n{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // openssl can still check the published pair on its own.
    let pem = d.keys.public.to_str().unwrap();
    let check = sh(&format!(
        "openssl pkeyutl -verify -pubin -inkey {pem} -rawin -in {m} -sigfile {s} 2>&1",
        m = d.repo.join("stable.json").display(),
        s = by_digest.display()
    ));
    assert!(check.contains("Signature Verified Successfully"), "{check}");

    // A repository published before sigs/ existed: .json.sig is used.
    d.publish("v3");
    fs::remove_dir_all(d.repo.join("sigs")).unwrap();
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v3"));

    // gc keeps the current manifest's signature and drops the others beyond --keep.
    d.publish("v4");
    d.publish("v5");
    run_bin("imgbuild", ["gc", "--repo", d.repo.to_str().unwrap(), "--keep", "0"]).ok();
    let left: Vec<_> = fs::read_dir(d.repo.join("sigs")).unwrap().flatten().map(|e| e.path()).collect();
    let current =
        d.repo.join(format!("sigs/{}.sig", Sha256Digest::of_bytes(&fs::read(d.repo.join("stable.json")).unwrap())));
    assert_eq!(left, vec![current], "gc --keep 0 must leave exactly the current manifest's signature");
}

/// Someone who can write to the source tree during a build
/// (another user, another CI job) must not make the builder read outside
/// the tree, nor hang it. After the walk, and before the packer reaches
/// them, a directory becomes a symlink to a secret elsewhere, and a file
/// becomes a FIFO.
#[test]
fn source_tree_races_never_escape_or_hang_the_build() {
    let work = tempfile::tempdir().unwrap();
    let keys = imgdeploy_tests::Keys::generate();
    let outside = work.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), vec![b'S'; 4096]).unwrap();
    for (case, swap) in [("symlinked directory", 0), ("file turned FIFO", 1)] {
        let src = work.path().join(format!("src{swap}"));
        let repo = work.path().join(format!("repo{swap}"));
        for i in 0..4 {
            fs::create_dir_all(src.join("a")).unwrap();
            fs::write(src.join(format!("a/noise{i}")), imgdeploy_tests::noise(6 << 20, i)).unwrap();
        }
        fs::create_dir_all(src.join("b/sub")).unwrap();
        fs::write(src.join("b/sub/secret"), vec![b'p'; 4096]).unwrap();
        let log = work.path().join(format!("log{swap}"));
        let mut child = std::process::Command::new(imgdeploy_tests::bin("imgbuild"))
            .arg("build")
            .arg(&src)
            .args(["--channel", "stable", "--level", "19", "--jobs", "1", "--key"])
            .arg(&keys.key)
            .arg("--repo")
            .arg(&repo)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The packer's temporary image appears once the walk is over.
        let started = std::time::Instant::now();
        let packing = || {
            fs::read_dir(repo.join("images"))
                .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".squashfs")))
                .unwrap_or(false)
        };
        while !packing() {
            assert!(started.elapsed().as_secs() < 60, "{case}: the build never started packing");
            assert!(child.try_wait().unwrap().is_none(), "{case}: the build ended before packing");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if swap == 0 {
            fs::rename(src.join("b/sub"), src.join("b/sub.away")).unwrap();
            std::os::unix::fs::symlink(&outside, src.join("b/sub")).unwrap();
        } else {
            fs::remove_file(src.join("b/sub/secret")).unwrap();
            imgdeploy_tests::run(std::process::Command::new("mkfifo").arg(src.join("b/sub/secret"))).ok();
        }
        assert!(child.try_wait().unwrap().is_none(), "{case}: packing finished before the swap; make the tree bigger");
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed().as_secs() > 120 {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{case}: the build hung");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let stderr = fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "{case}: the build succeeded and packed what it found after the swap:\n{stderr}");
        assert!(stderr.contains("was replaced"), "{case}: {stderr}");
        assert!(!repo.join("stable.json").exists(), "{case}: a manifest was signed");
    }
}
