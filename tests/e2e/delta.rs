//! Chunk delta updates: the image is rebuilt from local chunks plus
//! multi-range requests, byte-identical to the published one; every way the
//! delta can go wrong falls back or fails safely.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use imgdeploy_common::manifest::Manifest;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::faults::{FaultServer, Reply};
use imgdeploy_tests::{noise, require_root};

/// A tree of `n` incompressible files of 20..120 KiB, deterministic per `seed`.
fn make_tree(dir: &Path, n: usize, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        write_noise(&dir.join(format!("d{}/f{i:04}", i % 7)), 20_000 + (i * 7919) % 100_000, seed ^ i as u64);
    }
}

fn write_noise(path: &Path, len: usize, seed: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, noise(len, seed)).unwrap();
}

fn slot_image(d: &Deployment, slot: &str) -> Vec<u8> {
    fs::read(d.state.join(format!("slots/{slot}/image.squashfs"))).unwrap()
}

fn published_image(d: &Deployment, build: &serde_json::Value) -> Vec<u8> {
    let _ = d;
    fs::read(build["image"].as_str().unwrap()).unwrap()
}

/// Publishes `tree` without static deltas: these tests are about the
/// chunk delta (static deltas have their own, `static_delta.rs`).
fn publish_chunk_delta_only(d: &Deployment, tree: &Path, label: &str) -> serde_json::Value {
    d.publish_tree_with(tree, label, &["--deltas", "0"])
}

/// v1 applied in full, then v2 (a few files changed) published: the common start of every test.
fn two_versions(nginx_extra: &str) -> (Deployment, serde_json::Value) {
    let d = Deployment::new("", nginx_extra);
    let tree = d.dir.path().join("tree");
    make_tree(&tree, 150, 1);
    publish_chunk_delta_only(&d, &tree, "v1");
    let r = d.imgdeploy(&["apply", "--json"]).ok().json();
    assert_eq!(r["download"]["mode"], "full");
    for i in [3usize, 77, 140] {
        write_noise(&tree.join(format!("d{}/f{i:04}", i % 7)), 50_000, 999 + i as u64);
    }
    let b = publish_chunk_delta_only(&d, &tree, "v2");
    (d, b)
}

#[test]
fn privileged_delta_is_byte_identical_and_small() {
    if !require_root("privileged_delta_is_byte_identical_and_small") {
        return;
    }
    let (d, v2) = two_versions("");
    let size = v2["size"].as_u64().unwrap();
    let status_before = d.status();
    let plan = d.imgdeploy(&["apply", "--dry-run", "--json"]).ok().json();
    assert_eq!(plan["result"], "would-update");
    assert_eq!(plan["mode"], "delta");
    assert_eq!(d.status()["active"], status_before["active"], "dry run changed something");
    assert_eq!(d.status()["standby"], status_before["standby"], "dry run changed something");
    let log_before = d.nginx.log().len();
    let r = d.imgdeploy(&["apply", "--json"]).ok().json();
    let dl = &r["download"];
    assert_eq!(dl["mode"], "delta");
    assert_eq!(dl["downloaded"], plan["download_bytes"], "dry run predicted {plan} but apply did {dl}");
    assert_eq!(dl["requests"], plan["requests"]);
    let downloaded = dl["downloaded"].as_u64().unwrap();
    assert!(downloaded < size / 4, "delta downloaded {downloaded} of {size}");
    let computed = dl["computed"].as_u64().unwrap();
    assert_eq!(dl["downloaded"].as_u64().unwrap() + dl["reused"].as_u64().unwrap() + computed, size);
    assert_eq!(dl["computed"], plan["computed_bytes"], "dry run predicted {plan} but apply did {dl}");
    assert_eq!(slot_image(&d, "b"), published_image(&d, &v2), "delta image differs from the published one");
    // The changed files shift the data after them, so the hash tree is
    // new: it is computed here, and no chunk of it is fetched (only the one
    // chunk that straddles the data's end may reach into it).
    let m = Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    let tree = m.image.verity.as_ref().expect("images carry a hash tree").hash_offset;
    eprintln!("image {size} bytes, tree from {tree}, computed {computed}, downloaded {downloaded}");
    assert!(computed > 0, "no byte of the {}-byte tree was computed: {dl}", size - tree);
    let ranges = imgdeploy_tests::nginx::image_ranges(&d.nginx.log()[log_before..]);
    assert!(!ranges.is_empty(), "{:#?}", d.nginx.log());
    let mut into_tree = 0;
    for (start, end) in ranges {
        assert!(start < tree, "bytes {start}-{end} of the hash tree (from byte {tree}) were fetched");
        into_tree += end.saturating_add(1).saturating_sub(tree);
    }
    assert!(into_tree <= 128 * 1024, "{into_tree} bytes of the hash tree were fetched, more than one chunk");
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // The server saw multi-range requests answered with 206.
    assert!(
        d.nginx.log().iter().any(|l| l.contains("GET /images/") && l.contains(",") && l.contains(" 206 ")),
        "{:#?}",
        d.nginx.log()
    );
    d.imgdeploy(&["verify"]).ok();
}

#[test]
fn privileged_server_ignoring_range_falls_back_to_full_download() {
    if !require_root("privileged_server_ignoring_range_falls_back_to_full_download") {
        return;
    }
    let (d, v2) = two_versions("max_ranges 0;");
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("ignores HTTP Range requests; falling back to a full download"), "{}", r.stderr);
    assert_eq!(r.json()["download"]["mode"], "full");
    assert_eq!(slot_image(&d, "b"), published_image(&d, &v2));
}

#[test]
fn privileged_tampered_chunk_on_server_is_caught() {
    if !require_root("privileged_tampered_chunk_on_server_is_caught") {
        return;
    }
    let (d, v2) = two_versions("");
    // Flip a byte in the part of the new image that differs from the old one (a chunk that will be fetched).
    let path = Path::new(v2["image"].as_str().unwrap()).to_owned();
    let new = fs::read(&path).unwrap();
    let old = slot_image(&d, "a");
    let at = (1000..new.len()).find(|&i| old.get(i) != Some(&new[i])).unwrap();
    let mut bad = new.clone();
    bad[at + 10] ^= 0xff;
    fs::write(&path, bad).unwrap();
    let r = d.imgdeploy(&["apply"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("does not match the signed index"),
        "a tampered chunk was not named by its hash:\n{}",
        r.stderr
    );
    assert!(r.stderr.lines().any(|l| l.starts_with("error:") && l.contains("has sha256")), "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    d.assert_link_sound();
    fs::write(&path, new).unwrap();
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.status()["active"]["version"], "v2");
}

#[test]
fn privileged_tampered_chunk_in_local_slot_is_not_reused() {
    if !require_root("privileged_tampered_chunk_in_local_slot_is_not_reused") {
        return;
    }
    let (d, v2) = two_versions("");
    let clean = d.imgdeploy(&["apply", "--dry-run", "--json"]).ok().json();
    // Corrupt the middle of the active slot's image (a region v2 shares with v1).
    let img = d.state.join("slots/a/image.squashfs");
    let mut b = fs::read(&img).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    fs::write(&img, b).unwrap();
    let r = d.imgdeploy(&["apply", "--json"]).ok().json();
    assert_eq!(r["download"]["mode"], "delta");
    assert!(
        r["download"]["downloaded"].as_u64() > clean["download_bytes"].as_u64(),
        "the corrupted chunk was reused: {r}"
    );
    assert_eq!(slot_image(&d, "b"), published_image(&d, &v2));
}

#[test]
fn privileged_truncated_or_tampered_index_is_rejected() {
    if !require_root("privileged_truncated_or_tampered_index_is_rejected") {
        return;
    }
    let (d, v2) = two_versions("");
    let m: serde_json::Value = serde_json::from_slice(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    let idx = d.repo.join(m["index"]["path"].as_str().unwrap());
    let good = fs::read(&idx).unwrap();
    for (what, bad) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("tampered", {
            let mut b = good.clone();
            b[good.len() / 2] ^= 1;
            b
        }),
    ] {
        fs::write(&idx, &bad).unwrap();
        let plan = d.imgdeploy(&["apply", "--dry-run", "--json"]);
        assert!(
            plan.stderr.contains("truncated or tampered with"),
            "{what} index was not refused by its sha256:\n{}",
            plan.stderr
        );
        assert_eq!(plan.json()["mode"], "full", "{what}");
    }
    let r = d.imgdeploy(&["apply", "--json"]).ok();
    assert!(r.stderr.contains("truncated or tampered with; falling back to a full download"), "{}", r.stderr);
    assert_eq!(r.json()["download"]["mode"], "full");
    assert_eq!(slot_image(&d, "b"), published_image(&d, &v2));
    // No index was stored for that slot, since none verified.
    assert!(!d.state.join("slots/b/index.idx").exists());
}

#[test]
fn privileged_killed_delta_resumes() {
    if !require_root("privileged_killed_delta_resumes") {
        return;
    }
    let d = Deployment::new("", "limit_rate 1m;");
    let tree = d.dir.path().join("tree");
    make_tree(&tree, 150, 1);
    publish_chunk_delta_only(&d, &tree, "v1");
    d.imgdeploy(&["apply"]).ok();
    // Change a third of the files: a delta that takes a few seconds at 1 MB/s.
    for i in (0..150).step_by(3) {
        write_noise(&tree.join(format!("d{}/f{i:04}", i % 7)), 60_000, 5000 + i as u64);
    }
    let v2 = publish_chunk_delta_only(&d, &tree, "v2");
    let meta = d.state.join("slots/b/partial.json");
    let started = || fs::read_to_string(&meta).is_ok_and(|m| m.contains("\"delta\":true"));
    d.kill_apply_after("the delta started", Duration::from_secs(20), started, Duration::from_millis(1500));
    d.assert_link_sound();
    assert_eq!(d.status()["active"]["version"], "v1");
    let r = d.imgdeploy(&["apply", "--json"]).ok().json();
    assert_eq!(r["download"]["mode"], "delta");
    assert!(r["download"]["resumed_from"].as_u64().unwrap() > 0, "nothing resumed: {r}");
    assert_eq!(slot_image(&d, "b"), published_image(&d, &v2));
    d.assert_no_leaks();
}

/// Serves every file of the repository from a fault server, the image by `image`.
fn fault_repo(d: &Deployment, image: Reply) -> (FaultServer, String) {
    let f = FaultServer::start();
    let m = Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
    for entry in imgdeploy_tests::files_under(&d.repo) {
        let rel = entry.strip_prefix(&d.repo).unwrap().to_str().unwrap().to_owned();
        f.route(&format!("/{rel}"), Reply::Body(fs::read(&entry).unwrap()));
    }
    f.route(&format!("/{}", m.image.path), image);
    let src = f.url("/stable.json");
    (f, src)
}

/// A hostile server (a mirror) answering the delta's
/// Range requests cannot hold `apply` past `download_timeout`: not with
/// endless blank lines or header lines inside the multipart body, not with
/// an answer that leaves chunks out, not by answering each batch slowly
/// enough to pass a per-request timeout.
#[test]
fn privileged_a_hostile_range_answer_cannot_stall_the_delta() {
    if !require_root("privileged_a_hostile_range_answer_cannot_stall_the_delta") {
        return;
    }
    let d = Deployment::new("", "");
    let tree = d.dir.path().join("tree");
    make_tree(&tree, 400, 1);
    publish_chunk_delta_only(&d, &tree, "v1");
    d.imgdeploy(&["apply"]).ok();
    // Every fifth file changes: many separate runs of missing chunks, so several requests.
    for i in (0..400usize).step_by(5) {
        write_noise(&tree.join(format!("d{}/f{i:04}", i % 7)), 30_000, 5000 + i as u64);
    }
    publish_chunk_delta_only(&d, &tree, "v2");
    let plan = d.imgdeploy(&["apply", "--dry-run", "--json"]).ok().json();
    let requests = plan["requests"].as_u64().unwrap();
    assert!(requests >= 3, "the test needs several delta requests: {plan}");
    let image = {
        let m = Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap();
        fs::read(d.repo.join(&m.image.path)).unwrap()
    };
    let cfg = fs::read_to_string(&d.config).unwrap();
    let set_timeout = |t: &str| fs::write(&d.config, format!("{cfg}download_timeout = \"{t}\"\n")).unwrap();

    let refused = |what: &str, reply: Reply, needle: &str, limit: Duration| {
        let (_f, src) = fault_repo(&d, reply);
        let t = Instant::now();
        let r = d.imgdeploy(&["apply", "--source", &src]);
        let took = t.elapsed();
        assert_ne!(r.code, 0, "{what}: apply succeeded\n{}", r.stderr);
        assert!(r.stderr.contains(needle), "{what}: stderr lacks {needle:?}:\n{}", r.stderr);
        assert!(took < limit, "{what}: apply took {took:?}, more than {limit:?}:\n{}", r.stderr);
        assert_eq!(d.active_version().as_deref(), Some("v1"), "{what}");
        d.assert_link_sound();
        d.assert_no_leaks();
    };
    set_timeout("20s");
    let quick = Duration::from_secs(10);
    refused("endless blank lines", Reply::Multipart { head: vec![], repeat: b"\r\n".to_vec() }, "blank lines", quick);
    refused(
        "endless header lines",
        Reply::Multipart { head: b"--B\r\n".to_vec(), repeat: b"X-Pad: y\r\n".to_vec() },
        "header lines",
        quick,
    );
    refused(
        "an empty multipart answer",
        Reply::Multipart { head: b"--B--\r\n".to_vec(), repeat: vec![] },
        "left out",
        quick,
    );

    // Each request answered correctly but slowly: fine with time to spare...
    set_timeout("60s");
    let (f, src) = fault_repo(&d, Reply::SlowRanges(image.clone(), Duration::from_millis(1200)));
    // ...but not past download_timeout in total (each request alone is within it).
    set_timeout("3s");
    let t = Instant::now();
    let r = d.imgdeploy(&["apply", "--source", &src]);
    assert_ne!(
        r.code, 0,
        "a delta of {requests} requests of 1.2 s each finished within a 3 s download_timeout?\n{}",
        r.stderr
    );
    assert!(r.stderr.contains("download_timeout"), "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(8), "took {:?}", t.elapsed());
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    set_timeout("60s");
    let ok = d.imgdeploy(&["apply", "--source", &src, "--json"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(ok.json()["download"]["mode"], "delta", "{}", ok.stdout);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    drop(f);
}
