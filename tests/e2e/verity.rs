//! dm-verity hash trees in published images, checked by the independent
//! implementation: `veritysetup` (cryptsetup) verifies what `imgbuild build`
//! appends with the root hash and salt the signed manifest names, refuses it
//! after one flipped byte, and `veritysetup format` with the same salt and
//! uuid writes exactly our bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use imgdeploy_common::digest::{checkpoint_offsets, ResumableSha256, Sha256Digest};
use imgdeploy_common::manifest::Manifest;
use imgdeploy_common::verity::{uuid_of, Verity};
use imgdeploy_tests::{build_image, noise, run, Keys};

fn verity_of(build: &serde_json::Value) -> (PathBuf, u64, Verity) {
    let manifest = Manifest::parse(&fs::read(build["manifest"].as_str().unwrap()).unwrap()).unwrap();
    let v = manifest.image.verity.clone().expect("the manifest signs a dm-verity tree");
    (PathBuf::from(build["image"].as_str().unwrap()), manifest.image.size, v)
}

fn veritysetup_verify(image: &Path, v: &Verity, with_salt: bool) -> i32 {
    let mut cmd = Command::new("veritysetup");
    cmd.arg("verify").arg(image).arg(image).arg(v.root_hash.to_string());
    if with_salt {
        // Without the superblock: every parameter from the manifest, the
        // tree where the kernel table we load says it starts.
        cmd.arg(format!("--hash-offset={}", v.hash_start_block() * 4096));
        cmd.args(["--no-superblock", "--data-blocks"]).arg(v.data_blocks().to_string());
        cmd.arg(format!("--salt={}", v.salt)).args(["--hash=sha256", "--data-block-size=4096"]);
        cmd.arg("--hash-block-size=4096");
    } else {
        cmd.arg(format!("--hash-offset={}", v.hash_offset));
    }
    run(&mut cmd).code
}

fn uuid_text(u: [u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[test]
fn veritysetup_verifies_the_tree_and_writes_the_same_bytes() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    // 3 MiB of data: over 128 blocks (one hash block's worth), so the tree
    // has two levels.
    fs::write(src.join("d/noise"), noise(3 << 20, 7)).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("d/f{i}")), format!("file {i}\n").repeat(i * 31 + 1)).unwrap();
    }
    let keys = Keys::generate();
    let b = build_image(&src, &keys, "stable", &work.path().join("repo"), &[]);
    let (image, size, v) = verity_of(&b);
    assert_eq!(fs::metadata(&image).unwrap().len(), size);
    assert_eq!(v.hash_offset % 4096, 0);
    assert!(v.hash_offset > 3 << 20, "the tree follows the squashfs data");
    v.validate(size).unwrap();
    // The squashfs superblock's bytes_used ends inside the data area.
    let bytes = fs::read(&image).unwrap();
    let bytes_used = u64::from_le_bytes(bytes[40..48].try_into().unwrap());
    assert!(bytes_used <= v.hash_offset && v.hash_offset - bytes_used < 4096, "{bytes_used} vs {}", v.hash_offset);

    // The signed SHA-256 checkpoints are the states of the image's
    // prefixes where checkpoint_offsets puts them, and from the last one
    // the tail hashes to the image's sha256.
    let m = Manifest::parse(&fs::read(b["manifest"].as_str().unwrap()).unwrap()).unwrap();
    let ats: Vec<u64> = m.image.checkpoints.iter().map(|c| c.at).collect();
    assert_eq!(ats, checkpoint_offsets(v.hash_offset));
    assert!(ats.len() >= 2, "{ats:?}");
    let mut sha = ResumableSha256::new();
    for c in &m.image.checkpoints {
        sha.update(&bytes[sha.count() as usize..c.at as usize]);
        assert_eq!(sha.checkpoint().as_ref(), Some(c));
        sha = ResumableSha256::resume(c).unwrap();
    }
    sha.update(&bytes[v.hash_offset as usize..]);
    assert_eq!(sha.finish(), (Sha256Digest::of_bytes(&bytes), size));
    assert_eq!(m.image.sha256, Sha256Digest::of_bytes(&bytes));

    // veritysetup checks it, through our superblock and with the manifest's
    // parameters alone.
    assert_eq!(veritysetup_verify(&image, &v, false), 0, "veritysetup rejects our superblock or tree");
    assert_eq!(veritysetup_verify(&image, &v, true), 0, "veritysetup rejects the manifest's parameters");

    // One flipped byte anywhere in the data area, or in the tree, is caught.
    for at in [0, v.hash_offset / 2, v.hash_offset - 1, v.hash_offset + 4096, size - 1] {
        let bad = work.path().join("bad");
        let mut copy = bytes.clone();
        copy[at as usize] ^= 0x20;
        fs::write(&bad, &copy).unwrap();
        assert_ne!(veritysetup_verify(&bad, &v, true), 0, "a flipped byte at {at} of {size} passed veritysetup");
    }

    // veritysetup format over the same data, salt and uuid: the same bytes.
    let theirs = work.path().join("theirs");
    fs::write(&theirs, &bytes[..v.hash_offset as usize]).unwrap();
    let out = run(Command::new("veritysetup")
        .arg("format")
        .arg(&theirs)
        .arg(&theirs)
        .arg(format!("--hash-offset={}", v.hash_offset))
        .arg(format!("--salt={}", v.salt))
        .arg(format!("--uuid={}", uuid_text(uuid_of(&v.salt))))
        .args(["--hash=sha256", "--data-block-size=4096", "--hash-block-size=4096"]))
    .ok();
    assert!(out.stdout.contains(&v.root_hash.to_string()), "veritysetup's root hash differs:\n{}", out.stdout);
    let theirs = fs::read(&theirs).unwrap();
    assert_eq!(theirs.len(), bytes.len(), "veritysetup's image has another size");
    let first = theirs.iter().zip(&bytes).position(|(a, b)| a != b);
    assert_eq!(first, None, "our image differs from veritysetup's at byte {first:?}");
}

/// On a kernel without device-mapper (like the CI host), slots mount over
/// the bare loop device, `status` and the metrics say "install-time", the
/// fallback is said once, and `require_verity = true` refuses to mount
/// while the active version keeps serving. (On a host with dm-verity the
/// same steps must show "verity" instead; the Debian VM of the field test
/// checks that path and what it does with a corrupted block.)
#[test]
fn privileged_without_dm_verity_slots_say_install_time_and_require_verity_refuses() {
    use imgdeploy_tests::deploy::Deployment;
    if !imgdeploy_tests::require_root("privileged_without_dm_verity_slots_say_install_time_and_require_verity_refuses")
    {
        return;
    }
    let has_dm = Path::new("/dev/mapper/control").exists();
    let d = Deployment::new("", "");
    let metrics = d.dir.path().join("imgdeploy.prom");
    d.write_config(&format!("metrics_file = \"{}\"\n", metrics.display()));
    d.publish("v1");
    let r = d.imgdeploy(&["apply"]).ok();
    let warned = r.stderr.matches("mounting without dm-verity").count();
    let status = d.status();
    let want = if has_dm { "verity" } else { "install-time" };
    assert_eq!(status["active"]["integrity"], want, "{status}");
    assert_eq!(status["active"]["corrupted"], false);
    assert_eq!(status["standby"]["integrity"], serde_json::Value::Null, "an unmounted slot has no integrity");
    assert_eq!(warned, usize::from(!has_dm), "the fallback is said once: {}", r.stderr);
    if !has_dm {
        assert!(r.stderr.contains("device-mapper"), "the warning says why: {}", r.stderr);
        assert!(d.imgdeploy(&["status"]).ok().stdout.contains("checked at install only"));
    }
    let m = fs::read_to_string(&metrics).unwrap();
    assert!(m.contains(&format!("imgdeploy_active_integrity{{channel=\"stable\",integrity=\"{want}\"}} 1")), "{m}");
    assert!(m.contains("imgdeploy_active_corrupted{channel=\"stable\"} 0"), "{m}");

    d.write_config(&format!("metrics_file = \"{}\"\nrequire_verity = true\n", metrics.display()));
    d.publish("v2");
    if has_dm {
        d.imgdeploy(&["apply"]).ok();
        assert_eq!(d.status()["active"]["integrity"], "verity");
    } else {
        d.assert_refused("no dm-verity with require_verity", &["apply"], "require_verity", "v1");
        let r = d.imgdeploy(&["apply"]);
        assert!(r.stderr.contains("modprobe dm-verity"), "the error says what to do: {}", r.stderr);
        assert_eq!(d.status()["active"]["serial"], 1);
        // Without the key, the same image goes live.
        d.write_config("");
        d.imgdeploy(&["apply"]).ok();
        assert_eq!(d.active_version().as_deref(), Some("v2"));
    }
    d.assert_no_leaks();
}

/// Image bytes nginx sent, and image requests, in its log after line `skip`.
fn image_bytes_sent(log: &[String], skip: usize) -> (u64, usize) {
    imgdeploy_tests::nginx::image_bytes_sent(&log[skip.min(log.len())..])
}

/// `imgdeploy repair` finds a byte changed in the active image on disk,
/// rebuilds the image in the other slot from the good local chunks plus a
/// Range request for the damaged chunk (bytes counted in nginx's log, not
/// taken from our own report), switches to it, and serves the signed
/// content again; an intact host fetches nothing.
#[test]
fn privileged_repair_fetches_only_the_damaged_chunks() {
    use imgdeploy_tests::deploy::Deployment;
    if !imgdeploy_tests::require_root("privileged_repair_fetches_only_the_damaged_chunks") {
        return;
    }
    let d = Deployment::new("", "");
    let built = d.publish_to("stable", "v1", 4 << 20, &[]);
    let size = built["size"].as_u64().unwrap();
    d.imgdeploy(&["apply"]).ok();
    let good = fs::read(d.state.join("slots/a/image.squashfs")).unwrap();

    // Intact: repair re-hashes, finds nothing, fetches no image byte.
    let before = d.nginx.log().len();
    let r = d.imgdeploy(&["repair", "--json"]).ok();
    assert_eq!(r.json()["result"], "up-to-date", "{}", r.stdout);
    assert!(r.stderr.contains("matches the signed sha256"), "{}", r.stderr);
    assert_eq!(image_bytes_sent(&d.nginx.log(), before), (0, 0));

    // One byte in the middle of the active image changes on disk.
    let at = good.len() / 2;
    let image = d.state.join("slots/a/image.squashfs");
    let mut bad = good.clone();
    bad[at] ^= 0x55;
    fs::write(&image, &bad).unwrap();
    let before = d.nginx.log().len();
    let r = d.imgdeploy(&["repair", "--json"]).ok();
    let out = r.json();
    assert_eq!(out["result"], "switched", "{}", r.stdout);
    assert_eq!(out["slot"], "b");
    assert_eq!(out["serial"], 1, "the same signed serial, repaired");
    assert!(r.stderr.contains("slot a (serial 1) is damaged"), "{}", r.stderr);
    let (sent, requests) = image_bytes_sent(&d.nginx.log(), before);
    // A chunk is at most 128 KiB; the damaged byte lies in one (or on the
    // edge of two): never a full download of the 4 MiB image.
    assert!(requests >= 1 && sent <= 256 << 10, "{sent} bytes in {requests} requests of a {size}-byte image");
    assert_eq!(out["download"]["downloaded"], sent, "our report agrees with nginx");
    assert_eq!(fs::read(d.state.join("slots/b/image.squashfs")).unwrap(), good, "the repaired image is the signed one");
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    let r = d.imgdeploy(&["verify", "--json"]);
    assert_ne!(r.code, 0, "verify passes a damaged slot");
    let v = r.json();
    let health = |slot: &str| v.as_array().unwrap().iter().find(|c| c["slot"] == slot).unwrap()["result"].clone();
    assert_eq!((health("a"), health("b")), ("bad".into(), "ok".into()), "{v}");
    d.assert_no_leaks();
}
