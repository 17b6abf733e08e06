//! Static deltas: CI publishes `deltas/<from>-<to>.delta`, a frontend that
//! holds `from` makes the new image from it, byte-identical, for every kind
//! of change; a delta that is tampered with, truncated, made for another
//! image or recompressed differently never decides what gets installed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use imgdeploy_common::manifest::Manifest;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::{noise, require_root};

fn manifest(d: &Deployment) -> Manifest {
    Manifest::parse(&fs::read(d.repo.join("stable.json")).unwrap()).unwrap()
}

/// Re-signs the channel's manifest with the next serial after `edit`, as
/// a key holder would (the tests' way of publishing a delta CI would not).
fn resign(d: &Deployment, edit: impl FnOnce(&mut Manifest)) {
    let mut m = manifest(d);
    m.serial += 1;
    edit(&mut m);
    let repo = imgdeploy_builder::publish::Repo::open(&d.repo).unwrap();
    let key = imgdeploy_builder::keygen::load_private_key(&d.keys.key).unwrap();
    imgdeploy_builder::publish::sign_and_write(&repo, &key, &m).unwrap();
}

/// Replaces the bytes of the manifest's first delta and re-signs them.
fn resign_delta(d: &Deployment, bytes: &[u8]) {
    let path = d.repo.join(&manifest(d).deltas[0].path);
    fs::write(&path, bytes).unwrap();
    resign(d, |m| {
        m.deltas[0].sha256 = imgdeploy_common::digest::Sha256Digest::of_bytes(bytes);
        m.deltas[0].size = bytes.len() as u64;
    });
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Text-like (compressible) bytes, deterministic per `seed`.
fn text(len: usize, seed: u64) -> Vec<u8> {
    noise(len, seed).iter().map(|b| b"etaoin shrdlu\n"[(*b % 14) as usize]).collect()
}

fn full_tree(tree: &Path) {
    for i in 0..60usize {
        write(&tree.join(format!("lib/d{}/f{i:03}", i % 5)), &text(3_000 + i * 4_099, i as u64));
    }
    for i in 0..20usize {
        write(&tree.join(format!("pkg/share/p{i:02}")), &text(10_000 + i * 1_000, 100 + i as u64));
    }
    write(&tree.join("lib/random.bin"), &noise(300_000, 7));
}

/// Applies and checks the result: installed through the static delta
/// (unless `mode` says otherwise), byte-identical to what was published;
/// with `exact`, only the delta was fetched. Returns the
/// apply's `download` object.
fn apply_and_check(
    d: &Deployment,
    what: &str,
    built: &serde_json::Value,
    mode: &str,
    exact: bool,
) -> serde_json::Value {
    let from = active_image(d);
    let plan = d.imgdeploy(&["apply", "--dry-run", "--json"]).ok().json();
    let before = d.nginx.log().len();
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{what}: {}", r.stderr);
    let dl = r.json()["download"].clone();
    assert_eq!(dl["mode"], mode, "{what}: {dl}\n{}", r.stderr);
    assert!(built["version"].is_string(), "{what}: {built}");
    assert_image(d, what, built);
    let m = manifest(d);
    if exact {
        // Everything reproduced: the delta from the image that was active is all that came down.
        let log = d.nginx.log()[before..].to_vec();
        let fetched = imgdeploy_tests::nginx::image_ranges(&log);
        assert!(fetched.is_empty(), "{what}: image bytes fetched beside the delta: {fetched:?}\n{}", r.stderr);
        assert!(!log.iter().any(|l| l.contains("/indexes/")), "{what}: the chunk index was fetched: {log:#?}");
        let delta = m.deltas.iter().find(|x| x.from == from).map(|x| x.size);
        assert_eq!(dl["downloaded"].as_u64(), delta, "{what}: {dl}");
        assert_eq!(dl["static_delta"].as_u64(), delta, "{what}: {dl}");
        assert_eq!(plan["mode"], "static-delta", "{what}: {plan}");
        assert_eq!(plan["download_bytes"], dl["downloaded"], "{what}: the dry run said {plan}, apply did {dl}");
        eprintln!("STATIC-DELTA {what}: image {} bytes, delta {delta:?}, {dl}", m.image.size);
    }
    dl
}

/// The sha256 of the image the active slot holds.
fn active_image(d: &Deployment) -> imgdeploy_common::digest::Sha256Digest {
    let slot = d.status()["active"]["slot"].as_str().unwrap().to_owned();
    let bytes = fs::read(d.state.join(format!("slots/{slot}/manifest.json"))).unwrap();
    Manifest::parse(&bytes).unwrap().image.sha256
}

/// Every kind of change, one after another on one frontend.
#[test]
fn privileged_static_deltas_make_every_kind_of_change_byte_identical() {
    if !require_root("privileged_static_deltas_make_every_kind_of_change_byte_identical") {
        return;
    }
    let d = Deployment::new("", "");
    let tree = d.dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    d.publish_tree(&tree, "v0");
    d.imgdeploy(&["apply"]).ok();
    // An empty tree to a full one: no delta pays, or one does; either way the image is right.
    full_tree(&tree);
    let b = d.publish_tree(&tree, "full");
    let dl = d.imgdeploy(&["apply", "--json"]).ok().json()["download"].clone();
    assert!(dl["mode"] == "static-delta" || dl["mode"] == "full", "{dl}");
    assert_eq!(d.active_version().as_deref(), Some("full"));
    let _ = b;

    let step = |what: &str, change: &dyn Fn(&Path)| {
        change(&tree);
        let built = d.publish_tree(&tree, what);
        let m = manifest(&d);
        assert!(!m.deltas.is_empty(), "{what}: no delta published: {built}");
        let dl = apply_and_check(&d, what, &built, "static-delta", true);
        assert!(
            dl["downloaded"].as_u64().unwrap() * 4 < m.image.size,
            "{what}: downloaded {} of {}",
            dl["downloaded"],
            m.image.size
        );
    };
    step("edits", &|t| {
        for i in [3usize, 17, 44] {
            let p = t.join(format!("lib/d{}/f{i:03}", i % 5));
            let mut b = fs::read(&p).unwrap();
            let at = b.len() / 3;
            let n = 4096.min(b.len() - at);
            b[at..at + n].copy_from_slice(&text(n, 900 + i as u64));
            fs::write(&p, b).unwrap();
        }
    });
    step("appends", &|t| {
        for i in [5usize, 30] {
            let p = t.join(format!("lib/d{}/f{i:03}", i % 5));
            let mut b = fs::read(&p).unwrap();
            b.extend_from_slice(b"one more line\n");
            fs::write(&p, b).unwrap();
        }
    });
    step("inserts", &|t| {
        let p = t.join("lib/d2/f057");
        let mut b = fs::read(&p).unwrap();
        let at = b.len() / 2;
        b.splice(at..at, text(1000, 77));
        fs::write(&p, b).unwrap();
    });
    step("deletes", &|t| {
        for i in [10usize, 11, 12] {
            fs::remove_file(t.join(format!("lib/d{}/f{i:03}", i % 5))).unwrap();
        }
    });
    step("renames", &|t| {
        fs::rename(t.join("lib/d0/f000"), t.join("lib/d0/renamed")).unwrap();
        fs::rename(t.join("lib/d4"), t.join("lib/d4-renamed")).unwrap();
    });
    step("hardlinks", &|t| {
        fs::hard_link(t.join("lib/d1/f001"), t.join("lib/link1")).unwrap();
        fs::hard_link(t.join("pkg/share/p03"), t.join("lib/link2")).unwrap();
    });
    step("xattrs", &|t| {
        xattr::set(t.join("lib/d1/f001"), "user.origin", b"static delta test").unwrap();
        xattr::set(t.join("pkg/share/p05"), "user.mime", b"text/plain").unwrap();
    });
    step("package-replaced", &|t| {
        fs::remove_dir_all(t.join("pkg")).unwrap();
        for i in 0..20usize {
            write(&t.join(format!("pkg/share/p{i:02}")), &text(10_000 + i * 1_000, 500 + i as u64));
        }
    });
    // No static delta: a chunk delta, from slots whose images came by
    // static deltas (their chunk indexes were never fetched: computed now).
    for slot in ["a", "b"] {
        assert!(!d.state.join(format!("slots/{slot}/index.idx")).exists(), "slot {slot} fetched an index");
    }
    write(&tree.join("lib/d1/f006"), &text(9_000, 4242));
    let built = d.publish_tree_with(&tree, "chunk-delta", &["--deltas", "0"]);
    let dl = apply_and_check(&d, "chunk delta", &built, "delta", false);
    assert!(dl["downloaded"].as_u64().unwrap() * 4 < manifest(&d).image.size, "nothing reused: {dl}");
    let hardlinked = d.link.join("lib/link1");
    assert_eq!(
        fs::metadata(&hardlinked).unwrap().ino(),
        fs::metadata(d.link.join("lib/d1/f001")).unwrap().ino(),
        "hardlink lost"
    );
    assert_eq!(xattr::get(d.link.join("pkg/share/p05"), "user.mime").unwrap(), None, "the package was replaced");
    d.imgdeploy(&["verify"]).ok();
    d.assert_no_leaks();
}

/// A delta the key holder did not make, or one made for other images or
/// another compressor: the image still comes out right, from the chunk
/// delta or by fetching what did not reproduce.
#[test]
fn privileged_bad_static_deltas_fall_back() {
    if !require_root("privileged_bad_static_deltas_fall_back") {
        return;
    }
    let d = Deployment::new("", "");
    let tree = d.dir.path().join("tree");
    full_tree(&tree);
    d.publish_tree(&tree, "v1");
    d.imgdeploy(&["apply"]).ok();
    let mut n = 0;
    let mut next = |d: &Deployment| {
        n += 1;
        for i in [n, n + 20] {
            let p = tree.join(format!("lib/d{}/f{i:03}", i % 5));
            let mut b = fs::read(&p).unwrap();
            b[100..2100].copy_from_slice(&text(2000, 3000 + i as u64));
            fs::write(&p, b).unwrap();
        }
        d.publish_tree(&tree, &format!("v{}", n + 1))
    };

    // 1. The bucket flips a byte of the delta: its signed sha256 does not match.
    let built = next(&d);
    let path = d.repo.join(&manifest(&d).deltas[0].path);
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let dl = apply_and_check(&d, "tampered", &built, "delta", false);
    assert_eq!(dl["static_delta"], 0);

    // 2. Truncated, and signed that way: it does not parse.
    let built = next(&d);
    let good = fs::read(d.repo.join(&manifest(&d).deltas[0].path)).unwrap();
    resign_delta(&d, &good[..good.len() * 2 / 3]);
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("static delta not used") && r.stderr.contains("is unusable"), "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), built["version"].as_str());

    // 3. The delta of an older image under this one's name, signed: its header names other images.
    let built = next(&d);
    let m = manifest(&d);
    assert!(m.deltas.len() >= 2, "{m:?}");
    let older = fs::read(d.repo.join(&m.deltas[1].path)).unwrap();
    resign_delta(&d, &older);
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("the manifest says"), "{}", r.stderr);
    assert_eq!(r.json()["download"]["mode"], "delta");
    assert_eq!(d.active_version().as_deref(), built["version"].as_str());

    // 4. Another compressor level in its header: no patched block
    //    reproduces; those regions are fetched by Range and the image is right.
    let built = next(&d);
    let good = fs::read(d.repo.join(&manifest(&d).deltas[0].path)).unwrap();
    resign_delta(&d, &with_levels(&good, 1, 19));
    let dl = apply_and_check(&d, "another compressor", &built, "static-delta", false);
    assert_eq!(dl["patched"], 0, "{dl}");
    assert!(dl["downloaded"].as_u64().unwrap() > dl["static_delta"].as_u64().unwrap(), "{dl}");
    d.assert_no_leaks();
}

/// The delta file with the zstd levels of its header (data, then metadata,
/// after the magic, two digests, the size and the zstd version) replaced.
fn with_levels(delta: &[u8], level: u32, metadata_level: u32) -> Vec<u8> {
    let mut raw = zstd::decode_all(delta).unwrap();
    raw[8 + 64 + 8 + 4..8 + 64 + 8 + 8].copy_from_slice(&level.to_le_bytes());
    raw[8 + 64 + 8 + 8..8 + 64 + 8 + 12].copy_from_slice(&metadata_level.to_le_bytes());
    zstd::encode_all(&raw[..], 3).unwrap()
}

/// Killed after the delta arrived, while the regions that did not
/// reproduce were being fetched: the rerun uses the verified delta it
/// already has and ends with the right image.
#[test]
fn privileged_killed_static_delta_resumes() {
    if !require_root("privileged_killed_static_delta_resumes") {
        return;
    }
    let d = Deployment::new("", "limit_rate 300k;");
    let tree = d.dir.path().join("tree");
    full_tree(&tree);
    d.publish_tree(&tree, "v1");
    d.imgdeploy(&["apply"]).ok();
    for i in (0..60usize).step_by(4) {
        let p = tree.join(format!("lib/d{}/f{i:03}", i % 5));
        let mut b = fs::read(&p).unwrap();
        b[0..1000].copy_from_slice(&text(1000, 4000 + i as u64));
        fs::write(&p, b).unwrap();
    }
    let built = d.publish_tree(&tree, "v2");
    let good = fs::read(d.repo.join(&manifest(&d).deltas[0].path)).unwrap();
    resign_delta(&d, &with_levels(&good, 1, 19));
    let size = manifest(&d).deltas[0].size;
    let delta_file = d.state.join("slots/b/image.delta");
    let arrived = || fs::metadata(&delta_file).is_ok_and(|m| m.len() == size);
    d.kill_apply_after("the delta arrived", Duration::from_secs(30), arrived, Duration::from_millis(300));
    d.assert_link_sound();
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    let dl = apply_and_check(&d, "resumed", &built, "static-delta", false);
    assert_eq!(dl["static_delta"], 0, "the verified delta was fetched again: {dl}");
    d.assert_no_leaks();
}

/// A slot whose image came by a static delta has no fetched chunk index;
/// repairing a damaged byte of it still fetches only the chunk around it
/// (the signed index is that image's own, not one cut from damaged bytes).
#[test]
fn privileged_repairing_a_static_delta_slot_fetches_one_chunk() {
    if !require_root("privileged_repairing_a_static_delta_slot_fetches_one_chunk") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish_to("stable", "v1", 4 << 20, &[]);
    d.imgdeploy(&["apply"]).ok();
    d.publish_to("stable", "v2", 4 << 20, &[]);
    let r = d.imgdeploy(&["apply", "--json"]).ok();
    assert_eq!(r.json()["download"]["mode"], "static-delta", "{}", r.stdout);
    assert!(!d.state.join("slots/b/index.idx").exists());
    let image = d.state.join("slots/b/image.squashfs");
    let good = fs::read(&image).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x55;
    fs::write(&image, &bad).unwrap();
    let before = d.nginx.log().len();
    let r = d.imgdeploy(&["repair", "--json"]).ok();
    assert_eq!(r.json()["result"], "switched", "{}", r.stdout);
    // Not through the delta from slot a's image (it carries every change
    // since v1): the chunk delta, from the damaged slot itself.
    let log = d.nginx.log()[before..].to_vec();
    assert!(!log.iter().any(|l| l.contains("/deltas/")), "a repair fetched a static delta: {log:#?}");
    let (sent, requests) = imgdeploy_tests::nginx::image_bytes_sent(&log);
    assert!(requests >= 1 && sent <= 256 << 10, "{sent} bytes in {requests} requests to repair one byte\n{}", r.stderr);
    assert!(
        fs::read(d.state.join("slots/a/image.squashfs")).unwrap() == good,
        "the repaired image is not the signed one"
    );
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    d.assert_no_leaks();
}

/// The share of `path`'s bytes on extents it shares with another file
/// (filefrag's `shared` flag: XFS and btrfs reflinks).
fn shared_fraction(path: &Path) -> f64 {
    let out = imgdeploy_tests::run(std::process::Command::new("filefrag").arg("-v").arg(path)).ok().stdout;
    let (mut all, mut shared) = (0u64, 0u64);
    for line in out.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0].trim().parse::<u64>().is_err() {
            continue;
        }
        let n: u64 = f[3].trim().parse().unwrap_or(0);
        all += n;
        shared += if line.contains("shared") { n } else { 0 };
    }
    assert!(all > 0, "filefrag listed no extents of {}:\n{out}", path.display());
    shared as f64 / all as f64
}

/// On XFS and btrfs, an image built `--align`ed and made from a static
/// delta shares the extents of the old image's unchanged files instead of
/// copying them; an image packed without alignment cannot, as its files
/// start at any byte (the control, which shows what the figure measures).
#[test]
fn privileged_aligned_images_share_extents_on_xfs_and_btrfs() {
    if !require_root("privileged_aligned_images_share_extents_on_xfs_and_btrfs") {
        return;
    }
    for filesystem in ["xfs", "btrfs"] {
        let d = Deployment::on_filesystem(filesystem);
        let tree = d.dir.path().join("tree");
        for i in 0..40usize {
            write(&tree.join(format!("lib/f{i:02}.so")), &noise(300_000 + i * 5_003, i as u64));
            write(&tree.join(format!("etc/t{i:02}")), &text(2_000 + i * 301, 50 + i as u64));
        }
        d.publish_tree_with(&tree, "v1", &["--align"]);
        d.imgdeploy(&["apply"]).ok();
        let installed = |d: &Deployment| {
            let slot = d.status()["active"]["slot"].as_str().unwrap().to_owned();
            d.state.join(format!("slots/{slot}/image.squashfs"))
        };

        // A library near the end grows by a byte. Everything before it is
        // one copy, which starts mid-block (after the superblock, which
        // records the new size) at the same offset in both images.
        let mut changed = noise(300_000 + 35 * 5_003, 35);
        changed.push(b'!');
        write(&tree.join("lib/f35.so"), &changed);
        let built = d.publish_tree_with(&tree, "v2", &["--align"]);
        apply_and_check(&d, &format!("{filesystem}: aligned"), &built, "static-delta", true);
        let aligned = shared_fraction(&installed(&d));
        assert!(aligned > 0.9, "{filesystem}: only {:.1}% of the aligned image is shared", aligned * 100.0);

        // A like change packed without alignment.
        write(&tree.join("lib/f07.so"), &changed);
        let built = d.publish_tree_with(&tree, "v3", &[]);
        apply_and_check(&d, &format!("{filesystem}: packed"), &built, "static-delta", false);
        let packed = shared_fraction(&installed(&d));
        assert!(packed < 0.2, "{filesystem}: {:.1}% of a packed image is shared", packed * 100.0);
        eprintln!("SHARED {filesystem}: aligned {:.1}%, packed {:.1}%", aligned * 100.0, packed * 100.0);
        d.assert_link_sound();
    }
}

/// The old image's tree and data are the frontend's own bytes, which the
/// deployer takes the copied blocks' hashes from: whoever damages them (a
/// failing disk, a local root) must not get a wrong image installed. A
/// flipped hash in the old tree gives another dm-verity root; a flipped
/// byte of a copied block, whose old hash is right, another sha256 of the
/// whole image. Either way the image is checked chunk by chunk and comes
/// out right.
#[test]
fn privileged_a_damaged_old_tree_or_block_never_installs_a_wrong_image() {
    if !require_root("privileged_a_damaged_old_tree_or_block_never_installs_a_wrong_image") {
        return;
    }
    let d = Deployment::new("", "");
    let tree = d.dir.path().join("tree");
    full_tree(&tree);
    d.publish_tree(&tree, "v1");
    d.imgdeploy(&["apply"]).ok();
    let mut n = 0;
    let mut next = |d: &Deployment| {
        n += 1;
        let p = tree.join("pkg/share/p00");
        let mut b = fs::read(&p).unwrap();
        b[10..20].copy_from_slice(&text(10, 5000 + n));
        fs::write(&p, b).unwrap();
        d.publish_tree(&tree, &format!("v{}", n + 1))
    };
    // The active image's bytes at the middle of its data, and its block's hash.
    let active = |d: &Deployment| {
        let slot = d.status()["active"]["slot"].as_str().unwrap().to_owned();
        let m = Manifest::parse(&fs::read(d.state.join(format!("slots/{slot}/manifest.json"))).unwrap()).unwrap();
        let v = m.image.verity.unwrap();
        let block = v.data_blocks() / 2;
        (d.state.join(format!("slots/{slot}/image.squashfs")), block * 4096, v.leaves_offset().unwrap() + block * 32)
    };
    let flip = |path: &Path, at: u64| {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    };

    // Undamaged: the copied blocks' hashes come from the old tree, and
    // the image is installed from the delta alone.
    // Its data is checked in pieces, between the manifest's checkpoints.
    let built = next(&d);
    assert!(manifest(&d).image.checkpoints.len() >= 2, "{:?}", manifest(&d).image.checkpoints);
    let r = d.imgdeploy(&["apply", "--json", "-v"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("installed serial") && !r.stderr.contains("checking it chunk by chunk"), "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), built["version"].as_str());

    // 1. A hash in the old tree.
    let built = next(&d);
    let (image, _, leaf) = active(&d);
    flip(&image, leaf);
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("the static delta's data has dm-verity root"), "{}", r.stderr);
    assert_image(&d, "a damaged old tree", &built);

    // 2. A byte of a block the delta copies: its piece does not end in
    // the signed state.
    let built = next(&d);
    let (image, data, _) = active(&d);
    flip(&image, data + 1000);
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("does not have the SHA-256 checkpoints the manifest signs"), "{}", r.stderr);
    assert_image(&d, "a damaged old block", &built);

    // 3. The same without checkpoints (an older builder's manifest): the
    // image's sha256, on one core, refuses it.
    next(&d);
    resign(&d, |m| m.image.checkpoints.clear());
    let (image, data, _) = active(&d);
    flip(&image, data + 2000);
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("the image made by the static delta has sha256"), "{}", r.stderr);
    assert_eq!(manifest(&d).image.checkpoints, [], "installed without checkpoints");
    assert_image(&d, "a damaged old block, no checkpoints", &serde_json::json!({"version": manifest(&d).version}));

    // 4. A wrong state signed (a builder's bug): the right data is not
    // taken for wrong for long, nor a wrong state for right.
    let built = next(&d);
    resign(&d, |m| m.image.checkpoints[1].state.0[5] ^= 1);
    let r = d.imgdeploy(&["apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("does not have the SHA-256 checkpoints the manifest signs"), "{}", r.stderr);
    assert_image(&d, "a wrong checkpoint signed", &serde_json::json!({"version": built["version"]}));
    d.assert_no_leaks();
}

/// The active image is the one published as `built`, byte for byte.
fn assert_image(d: &Deployment, what: &str, built: &serde_json::Value) {
    assert_eq!(d.active_version().as_deref(), built["version"].as_str(), "{what}");
    let m = manifest(d);
    let slot = d.status()["active"]["slot"].as_str().unwrap().to_owned();
    let got = fs::read(d.state.join(format!("slots/{slot}/image.squashfs"))).unwrap();
    assert!(got == fs::read(d.repo.join(&m.image.path)).unwrap(), "{what}: the installed image differs");
}
