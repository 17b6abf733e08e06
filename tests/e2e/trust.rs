//! Attacks on the trust model by someone who controls the mirror, the
//! bucket or the CDN but not the signing key. Each test performs the attack
//! end to end and asserts that it fails.

use std::fs;

use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::{require_root, run_bin};

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
    let x1 = d.publish_tree(&x, "X");
    d.imgdeploy(&["apply"]).ok();
    d.publish_tree(&y, "Y");
    d.imgdeploy(&["apply"]).ok();
    let withdrawn = saved(&d);
    let x3 = d.publish_tree(&x, "X");
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
    run_bin(
        "imgbuild",
        [
            "rollout",
            "--repo",
            d.repo.to_str().unwrap(),
            "--channel",
            "stable",
            "--percent",
            "100",
            "--key",
            d.keys.key.to_str().unwrap(),
        ],
    )
    .ok();
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
