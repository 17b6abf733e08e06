//! dm-verity hash trees in published images, checked by the independent
//! implementation: `veritysetup` (cryptsetup) verifies what `imgbuild build`
//! appends with the root hash and salt the signed manifest names, refuses it
//! after one flipped byte, and `veritysetup format` with the same salt and
//! uuid writes exactly our bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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
