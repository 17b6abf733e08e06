//! imgbuild end to end: every entry type round-trips through the kernel and
//! unsquashfs, builds are byte-reproducible, verify catches any flipped bit,
//! keys and signatures interoperate with openssl, gc keeps what is referenced.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_tests::nginx::Nginx;
use imgdeploy_tests::snapshot::{assert_same, snapshot};
use imgdeploy_tests::trees::{every_entry_type, random_tree, RandomEntry, Spec};
use imgdeploy_tests::{build_image, require_root, run, run_bin, sh, Keys, LoopMount};
use proptest::prelude::*;

fn image_of(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(v["image"].as_str().unwrap())
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn privileged_round_trip_every_entry_type() {
    if !require_root("privileged_round_trip_every_entry_type") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    every_entry_type(&src);
    let keys = Keys::generate();
    let out = build_image(&src, &keys, "stable", &work.path().join("repo"), &[]);
    let image = image_of(&out);
    assert!(image.is_absolute() && Path::new(out["manifest"].as_str().unwrap()).is_absolute());
    for key in ["manifest", "image", "sha256", "size", "serial", "version"] {
        assert!(!out[key].is_null(), "--json lacks {key}: {out}");
    }
    let m = LoopMount::new(&image);
    assert_same(&snapshot(&src), &snapshot(m.path()));

    // The sparse file stays sparse: the kernel reports far fewer blocks than its size.
    let md = fs::metadata(m.path().join("sparse")).unwrap();
    assert_eq!(md.len(), 20 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&md) * 512 < 1 << 20,
        "sparse file occupies {} blocks",
        std::os::unix::fs::MetadataExt::blocks(&md)
    );
    // `..` is listed in the root and in subdirectories (parent inode numbers are right).
    for dir in [m.path().to_owned(), m.path().join("etc/sub"), m.path().join("empty")] {
        let ls = sh(&format!("ls -a '{}'", dir.display()));
        assert!(ls.lines().any(|l| l == ".."), "no `..` in {}: {ls}", dir.display());
    }
    let root_md = fs::metadata(m.path()).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&root_md),
        2 + 4,
        "root nlink = 2 + subdirectories (deep, empty, etc, many)"
    );
}

#[test]
fn privileged_unsquashfs_agrees_with_the_source() {
    if !require_root("privileged_unsquashfs_agrees_with_the_source") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    every_entry_type(&src);
    let keys = Keys::generate();
    let image = image_of(&build_image(&src, &keys, "stable", &work.path().join("repo"), &[]));
    let snap = snapshot(&src);
    let checked = unsquashfs_agrees(&image, &snap);
    assert!(checked + 2 >= snap.len(), "only {checked} of {} lines checked", snap.len());
}

/// Compares `unsquashfs -lln` (the squashfs-tools oracle, independent of the
/// kernel) of `image` with the source snapshot: the entry count, and type,
/// owner, size and device numbers of every line whose name parses back
/// (names with newlines or invalid UTF-8 do not). Returns how many were checked.
fn unsquashfs_agrees(image: &Path, snap: &imgdeploy_tests::snapshot::Snapshot) -> usize {
    let out = run(Command::new("unsquashfs").args(["-lln", "-d", "R"]).arg(image)).ok();
    // unsquashfs prints one line per entry; names with a newline span two lines, so compare counts and every line that parses.
    let lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains(" R")).collect();
    assert_eq!(lines.len(), snap.len(), "entry count differs");
    let mut checked = 0;
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let path_start = line.find(" R").unwrap() + 2;
        let rest = &line[path_start..];
        let path = rest.trim_start_matches('/').split(" -> ").next().unwrap();
        let Some(e) = snap.get(path.as_bytes()) else { continue };
        let (uid, gid) = fields[1].split_once('/').unwrap();
        assert_eq!((uid.parse::<u32>().unwrap(), gid.parse::<u32>().unwrap()), (e.uid, e.gid), "{line}");
        let perm = fields[0];
        assert_eq!(perm.chars().next().unwrap(), if e.kind == 'f' { '-' } else { e.kind }, "{line}");
        match e.kind {
            'f' | 'l' => assert_eq!(fields[2].parse::<u64>().unwrap(), e.size, "{line}"),
            'b' | 'c' => {
                // unsquashfs 4.5 decodes device numbers with the old 8:8 split (and prints
                // large ones as -1), so it can only confirm small numbers; the kernel
                // round trip checks the large ones (300:70000, 4095:1048575).
                let (maj, min) = e.rdev.unwrap();
                if maj > 255 || min > 255 {
                    checked += 1;
                    continue;
                }
                let enc = (min & 0xff) | (maj << 8) | ((min & !0xff) << 12);
                let shown = format!("{},{}", enc >> 8, enc & 0xff);
                let squeezed = line.split_whitespace().collect::<Vec<_>>().join(" ").replace(", ", ",");
                assert!(squeezed.contains(&shown), "{line} lacks {shown}");
            }
            _ => {}
        }
        checked += 1;
    }
    checked
}

fn entry_strategy() -> impl Strategy<Value = RandomEntry> {
    let name = prop::collection::vec(prop::sample::select(b"abcxyz019._- \xff\xc3".to_vec()), 1..12);
    let spec = prop_oneof![
        4 => (0usize..400_000, 1u8..255).prop_map(|(len, seed)| Spec::File { len, seed }),
        1 => (0usize..3).prop_map(|_| Spec::File { len: 0, seed: 1 }),
        3 => Just(Spec::Dir),
        2 => prop::collection::vec(prop::sample::select(b"ab/.c".to_vec()), 1..40).prop_map(Spec::Symlink),
        1 => (0usize..50).prop_map(Spec::Hardlink),
        1 => Just(Spec::Fifo),
        1 => (0u32..4096, 0u32..1_048_576).prop_map(|(a, b)| Spec::CharDev(a, b)),
    ];
    (
        0usize..64,
        name,
        spec,
        0u32..0o7777,
        prop::sample::select(vec![0u32, 1, 1000, 65534, 100_000]),
        0u32..70000,
        0u32..u32::MAX,
        prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    )
        .prop_map(|(dir, name, spec, mode, uid, gid, mtime, xattr)| {
            // Devices and fifos are made with shell tools: keep their names plain.
            let name = if matches!(spec, Spec::Fifo | Spec::CharDev(..)) {
                name.iter().map(|&b| if b.is_ascii_alphanumeric() { b } else { b'n' }).collect()
            } else {
                name
            };
            RandomEntry { dir, name, spec, mode, uid, gid, mtime, xattr }
        })
}

/// 24 random trees per run (`IMGDEPLOY_PROPTEST_CASES` for more), from a
/// fresh seed printed with any failure (`IMGDEPLOY_PROPTEST_SEED` repeats it).
fn random_tree_config() -> ProptestConfig {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("IMGDEPLOY_PROPTEST_CASES").unwrap_or(24) as u32;
    let seed = env("IMGDEPLOY_PROPTEST_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("random trees: {cases} cases from seed {seed} (IMGDEPLOY_PROPTEST_SEED={seed} repeats them)");
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(random_tree_config())]
    #[test]
    fn privileged_round_trip_random_trees(entries in prop::collection::vec(entry_strategy(), 1..120)) {
        if !require_root("privileged_round_trip_random_trees") {
            return Ok(());
        }
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        random_tree(&src, &entries);
        let keys = Keys::generate();
        let image = image_of(&build_image(&src, &keys, "stable", &work.path().join("repo"), &["--level", "3"]));
        let m = LoopMount::new(&image);
        let snap = snapshot(&src);
        assert_same(&snap, &snapshot(m.path()));
        // And the independent reader agrees too.
        unsquashfs_agrees(&image, &snap);
    }
}

#[test]
fn builds_are_byte_reproducible() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    for i in 0..200 {
        fs::write(src.join(format!("a/f{i}")), format!("{i}").repeat(i * 97)).unwrap();
    }
    fs::write(src.join("a/b/big"), (0..2_000_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>()).unwrap();
    xattr::set(src.join("a/f1"), "user.b", b"2").unwrap();
    xattr::set(src.join("a/f1"), "user.a", b"1").unwrap();
    let keys = Keys::generate();
    let build = |repo: &str, jobs: &str| {
        let mut cmd = Command::new(imgdeploy_tests::bin("imgbuild"));
        cmd.env("SOURCE_DATE_EPOCH", "1700000000").arg("build").arg(&src).arg("--key").arg(&keys.key);
        // An old SOURCE_DATE_EPOCH needs a validity reaching past now: an
        // already-expired manifest is refused at signing.
        cmd.args(["--channel", "stable", "--json", "--jobs", jobs, "--expires-in", "36500d"]);
        cmd.arg("--repo").arg(work.path().join(repo));
        run(&mut cmd).ok().json()
    };
    let a = build("r1", "1");
    let b = build("r2", "2");
    assert_eq!(a["sha256"], b["sha256"], "images differ between 1 and 2 compression threads");
    let manifest = |v: &serde_json::Value| fs::read(v["manifest"].as_str().unwrap()).unwrap();
    assert_eq!(manifest(&a), manifest(&b), "manifests differ");
    assert_eq!(fs::read(image_of(&a)).unwrap(), fs::read(image_of(&b)).unwrap());
    assert!(String::from_utf8(manifest(&a)).unwrap().contains("\"created\": \"2023-11-14T22:13:20Z\""));

    // One byte changed in the tree: a different image.
    let mut data = fs::read(src.join("a/b/big")).unwrap();
    data[1_000_000] ^= 1;
    fs::write(src.join("a/b/big"), data).unwrap();
    let c = build("r3", "2");
    assert_ne!(a["sha256"], c["sha256"]);
    // And the content address is the real sha256 of the file.
    let (sha, _) = Sha256Digest::of_reader(fs::File::open(image_of(&c)).unwrap()).unwrap();
    assert_eq!(c["sha256"].as_str().unwrap(), sha.to_string());
}

#[test]
fn openssl_verifies_our_signatures_and_we_accept_its_keys() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    // Our key: openssl reads both halves and verifies the detached signature.
    let keys = Keys::generate();
    assert_eq!(fs::metadata(&keys.key).unwrap().permissions().mode() & 0o777, 0o600);
    run(Command::new("openssl").args(["pkey", "-noout", "-in"]).arg(&keys.key)).ok();
    run(Command::new("openssl").args(["pkey", "-pubin", "-noout", "-in"]).arg(&keys.public)).ok();
    let out = build_image(&src, &keys, "stable", &work.path().join("repo"), &[]);
    let manifest = out["manifest"].as_str().unwrap();
    let sig = format!("{manifest}.sig");
    assert_eq!(fs::read(&sig).unwrap().len(), 64);
    let v = run(Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(&keys.public)
        .args(["-rawin", "-in", manifest, "-sigfile", &sig]))
    .ok();
    assert!(v.stdout.contains("Signature Verified Successfully"), "{}", v.stdout);

    // openssl's key: we sign with it, openssl's public key verifies with imgbuild verify.
    let ok = work.path().join("ossl.key");
    let op = work.path().join("ossl.pub");
    run(Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(&ok)).ok();
    run(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&ok).arg("-out").arg(&op)).ok();
    fs::set_permissions(&ok, fs::Permissions::from_mode(0o600)).unwrap();
    let repo2 = work.path().join("repo2");
    let mut cmd = Command::new(imgdeploy_tests::bin("imgbuild"));
    cmd.arg("build").arg(&src).arg("--key").arg(&ok).args(["--channel", "beta", "--json"]).arg("--repo").arg(&repo2);
    let out2 = run(&mut cmd).ok().json();
    run_bin(
        "imgbuild",
        [OsStr::new("verify"), OsStr::new(out2["manifest"].as_str().unwrap()), OsStr::new("--pub"), op.as_os_str()],
    )
    .ok();
    // ... and the other key is refused.
    run_bin(
        "imgbuild",
        [
            OsStr::new("verify"),
            OsStr::new(out2["manifest"].as_str().unwrap()),
            OsStr::new("--pub"),
            keys.public.as_os_str(),
        ],
    )
    .fails_with("does not verify");
}

#[test]
fn verify_rejects_one_flipped_bit_anywhere() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("x"), vec![5u8; 100_000]).unwrap();
    let keys = Keys::generate();
    let out = build_image(&src, &keys, "stable", &work.path().join("repo"), &[]);
    let manifest = PathBuf::from(out["manifest"].as_str().unwrap());
    let sig = PathBuf::from(format!("{}.sig", manifest.display()));
    let by_digest =
        work.path().join(format!("repo/sigs/{}.sig", Sha256Digest::of_bytes(&fs::read(&manifest).unwrap())));
    let image = image_of(&out);
    let verify = || {
        run_bin("imgbuild", [OsStr::new("verify"), manifest.as_os_str(), OsStr::new("--pub"), keys.public.as_os_str()])
    };
    verify().ok();
    let flip = |p: &Path, at: usize| {
        let mut b = fs::read(p).unwrap();
        let i = at % b.len();
        b[i] ^= 0x10;
        fs::write(p, b).unwrap();
    };
    let cases: [(&Path, usize, &str); 6] = [
        (&manifest, 30, "does not verify"),
        (&manifest, 10_000, "does not verify"),
        (&sig, 5, "does not verify"),
        (&by_digest, 5, "does not verify"),
        (&image, 0, "but the manifest signs"),
        (&image, 50_000, "but the manifest signs"),
    ];
    for (file, at, msg) in cases {
        flip(file, at);
        verify().fails_with(msg);
        flip(file, at);
        verify().ok();
    }
    // Truncated image and extra bytes appended are caught by size.
    let orig = fs::read(&image).unwrap();
    fs::write(&image, &orig[..orig.len() - 1]).unwrap();
    verify().fails_with("bytes but the manifest signs");
    fs::write(&image, [&orig[..], b"x"].concat()).unwrap();
    verify().fails_with("bytes but the manifest signs");
    fs::write(&image, &orig).unwrap();
    // A missing image names it.
    fs::remove_file(&image).unwrap();
    verify().fails_with("cannot read");
}

#[test]
fn privileged_verify_over_http_from_nginx() {
    if !require_root("privileged_verify_over_http_from_nginx") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    build_image(&src, &keys, "stable", &repo, &[]);
    let nginx = Nginx::serve(&repo);
    let v = run_bin(
        "imgbuild",
        [
            OsStr::new("verify"),
            OsStr::new(&nginx.url("stable.json")),
            OsStr::new("--pub"),
            keys.public.as_os_str(),
            OsStr::new("--json"),
        ],
    )
    .ok();
    assert_eq!(v.json()["manifest"]["serial"], 1);
    run_bin(
        "imgbuild",
        [OsStr::new("verify"), OsStr::new(&nginx.url("nope.json")), OsStr::new("--pub"), keys.public.as_os_str()],
    )
    .fails_with("HTTP 404");
    assert!(nginx.log().iter().any(|l| l.contains("GET /images/") && l.contains(" 200 ")), "{:?}", nginx.log());
}

#[test]
fn expired_manifest_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let keys = Keys::generate();
    // The creation time is whole seconds, so a 1 s lifetime can already be
    // past when the build signs on a loaded machine: give it 5 s and wait
    // for the expiry instead of guessing how long the build takes.
    let out = build_image(&src, &keys, "stable", &work.path().join("repo"), &["--expires-in", "5s"]);
    let verify = || {
        run_bin(
            "imgbuild",
            [
                OsStr::new("verify"),
                OsStr::new(out["manifest"].as_str().unwrap()),
                OsStr::new("--pub"),
                keys.public.as_os_str(),
            ],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while verify().code == 0 {
        assert!(std::time::Instant::now() < deadline, "a manifest with a 5 s lifetime still verifies after 30 s");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    verify().fails_with("expired");
}

#[test]
fn excludes_leave_paths_out() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("var/cache/apt")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("var/cache/apt/pkg"), b"x").unwrap();
    fs::write(src.join("etc/a.log"), b"x").unwrap();
    fs::write(src.join("etc/keep"), b"x").unwrap();
    fs::write(src.join("top.log"), b"x").unwrap();
    let keys = Keys::generate();
    let out = build_image(
        &src,
        &keys,
        "stable",
        &work.path().join("repo"),
        &["--exclude", "var/cache/*", "--exclude", "*.log"],
    );
    let listing = run(Command::new("unsquashfs").args(["-lln", "-d", ""]).arg(image_of(&out))).ok().stdout;
    assert!(listing.contains("/etc/keep") && listing.contains("/var/cache"), "{listing}");
    assert!(!listing.contains("apt") && !listing.contains("top.log"), "{listing}");
    assert!(listing.contains("/etc/a.log"), "`*` must not cross `/`: {listing}");
    let out2 = build_image(&src, &keys, "stable", &work.path().join("repo"), &["--exclude", "**/*.log"]);
    let listing2 = run(Command::new("unsquashfs").args(["-lln", "-d", ""]).arg(image_of(&out2))).ok().stdout;
    assert!(!listing2.contains(".log"), "{listing2}");
}

/// Every bad input: one-line error naming the thing, non-zero exit, nothing new in the repository.
#[test]
fn privileged_bad_input_writes_nothing() {
    if !require_root("privileged_bad_input_writes_nothing") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let src = w.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"data").unwrap();
    let keys = Keys::generate();
    let repo = w.join("repo");
    build_image(&src, &keys, "stable", &repo, &[]);
    let before = (listing(&repo), listing(&repo.join("images")), fs::read(repo.join("stable.json")).unwrap());
    let imgbuild = |args: &[&OsStr]| run_bin("imgbuild", args);
    let b = |s: &str| OsStr::new(s).to_owned();
    let base = |src: &Path, key: &Path| {
        vec![
            b("build"),
            src.as_os_str().to_owned(),
            b("--key"),
            key.as_os_str().to_owned(),
            b("--channel"),
            b("stable"),
            b("--repo"),
            repo.as_os_str().to_owned(),
        ]
    };
    let call = |v: Vec<std::ffi::OsString>| imgbuild(&v.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());

    // SRC missing, SRC a file.
    call(base(&w.join("missing"), &keys.key)).fails_with("missing");
    call(base(&src.join("d/f"), &keys.key)).fails_with("is not a directory");
    // Wrong key file: garbage, a public key, missing.
    fs::write(w.join("garbage.key"), b"not a key").unwrap();
    call(base(&src, &w.join("garbage.key"))).fails_with("garbage.key is not an Ed25519 private key");
    call(base(&src, &keys.public)).fails_with("is not an Ed25519 private key");
    call(base(&src, &w.join("nokey.key"))).fails_with("nokey.key does not exist");
    // Serial must not go backwards.
    let mut args = base(&src, &keys.key);
    args.extend([b("--serial"), b("1")]);
    call(args).fails_with("serial 1 for channel `stable` is not above the published serial 1");
    // Bad channel and level.
    let mut args = base(&src, &keys.key);
    args[5] = b("../evil");
    call(args).fails_with("channel");

    // Unreadable file and directory, as an unprivileged user (root reads everything).
    let nobody_tree = w.join("nobody");
    fs::create_dir_all(nobody_tree.join("locked")).unwrap();
    fs::write(nobody_tree.join("secret"), b"s").unwrap();
    let nobody_repo = w.join("nobody-repo");
    fs::create_dir_all(&nobody_repo).unwrap();
    let nobody_key = w.join("nobody.key");
    fs::copy(&keys.key, &nobody_key).unwrap();
    sh(&format!(
        "chown -R 65534:65534 '{0}' '{1}' '{2}' && chmod 755 '{3}' && chmod 000 '{0}/secret'",
        nobody_tree.display(),
        nobody_repo.display(),
        nobody_key.display(),
        w.display()
    ));
    let as_nobody = |tree: &Path, repo: &Path| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(imgdeploy_tests::bin("imgbuild"))
            .arg("build")
            .arg(tree);
        c.arg("--key").arg(&nobody_key).args(["--channel", "stable"]).arg("--repo").arg(repo);
        run(&mut c)
    };
    as_nobody(&nobody_tree, &nobody_repo).fails_with("secret");
    fs::set_permissions(nobody_tree.join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(nobody_tree.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    as_nobody(&nobody_tree, &nobody_repo).fails_with("locked");
    assert_eq!(listing(&nobody_repo.join("images")), Vec::<String>::new(), "a failed build left files");
    assert!(!nobody_repo.join("stable.json").exists());
    // A repository nobody cannot write.
    fs::set_permissions(nobody_tree.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    let root_repo = w.join("root-repo");
    fs::create_dir_all(root_repo.join("images")).unwrap();
    as_nobody(&nobody_tree, &root_repo).fails_with("is not writable");
    // A repository path that is a file.
    let mut args = base(&src, &keys.key);
    args[7] = src.join("d/f").into_os_string();
    call(args).fails_with("is not writable");
    // Unsupported xattr (POSIX ACL).
    if run(Command::new("sh").arg("-c").arg(format!("setfacl -m u:65534:r '{}'", src.join("d/f").display()))).code == 0
    {
        call(base(&src, &keys.key)).fails_with("system.posix_acl_access");
    }

    assert_eq!(
        (listing(&repo), listing(&repo.join("images")), fs::read(repo.join("stable.json")).unwrap()),
        before,
        "a failed build changed the repository"
    );
}

#[test]
fn keygen_refuses_to_overwrite() {
    let keys = Keys::generate();
    let prefix = keys.dir.path().join("test");
    let before = fs::read(&keys.key).unwrap();
    run_bin("imgbuild", [OsStr::new("keygen"), OsStr::new("--out"), prefix.as_os_str()]).fails_with("already exists");
    assert_eq!(fs::read(&keys.key).unwrap(), before);
    // Refuses when only the .pub exists too, writing neither.
    let other = keys.dir.path().join("other");
    fs::write(keys.dir.path().join("other.pub"), b"x").unwrap();
    run_bin("imgbuild", [OsStr::new("keygen"), OsStr::new("--out"), other.as_os_str()])
        .fails_with("other.pub already exists");
    assert!(!keys.dir.path().join("other.key").exists());
}

#[test]
fn gc_removes_only_unreferenced_images_beyond_keep() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    let mut images = Vec::new();
    // Fixed mtimes: the image records them, and rewriting a file may cross a second.
    let write_version = |i: u32| {
        fs::write(src.join("v"), format!("version {i}")).unwrap();
        sh(&format!("touch -d @1000000 '{0}/v' '{0}'", src.display()));
    };
    for i in 0..4 {
        write_version(i);
        images.push(image_of(&build_image(&src, &keys, "stable", &repo, &["--deltas", "0"])));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // beta pins the first image.
    write_version(0);
    let beta = image_of(&build_image(&src, &keys, "beta", &repo, &[]));
    assert_eq!(beta, images[0], "same tree, same content address");
    let r = run_bin(
        "imgbuild",
        [
            OsStr::new("gc"),
            OsStr::new("--repo"),
            repo.as_os_str(),
            OsStr::new("--keep"),
            OsStr::new("1"),
            OsStr::new("--json"),
        ],
    )
    .ok()
    .json();
    let removed_images =
        r["removed"].as_array().unwrap().iter().filter(|p| p.as_str().unwrap().contains("/images/")).count();
    assert_eq!(removed_images, 1, "{r}");
    let removed_sigs =
        r["removed"].as_array().unwrap().iter().filter(|p| p.as_str().unwrap().contains("/sigs/")).count();
    // Five manifests were signed; two are current, one more is kept.
    assert_eq!(removed_sigs, 2, "{r}");
    let removed_maps =
        r["removed"].as_array().unwrap().iter().filter(|p| p.as_str().unwrap().contains("/maps/")).count();
    assert_eq!(removed_maps, 1, "{r}");
    assert_eq!(
        r["removed"].as_array().unwrap().len(),
        5,
        "one image, its index, its block map and two signatures: {r}"
    );
    assert!(images[0].exists() && images[3].exists(), "referenced images must stay");
    assert!(images[2].exists(), "the newest unreferenced image is kept");
    assert!(!images[1].exists(), "older unreferenced image removed");
    // A static delta keeps the image it starts from (and its block map):
    // the next build makes its delta from there.
    write_version(4);
    let newest = image_of(&build_image(&src, &keys, "stable", &repo, &["--deltas", "1"]));
    let m = imgdeploy_common::manifest::Manifest::parse(&fs::read(repo.join("stable.json")).unwrap()).unwrap();
    assert_eq!(m.deltas.len(), 1, "{m:?}");
    let gc0 = || {
        run_bin(
            "imgbuild",
            [OsStr::new("gc"), OsStr::new("--repo"), repo.as_os_str(), OsStr::new("--keep"), OsStr::new("0")],
        )
        .ok()
    };
    gc0();
    assert!(newest.exists() && images[3].exists(), "the image and its delta's from must stay");
    assert!(repo.join(&m.deltas[0].path).exists() && repo.join(&m.deltas[0].from_map.path).exists());
    assert!(!images[2].exists(), "unreferenced beyond --keep 0");
    // Once no manifest lists the delta, it goes too.
    write_version(5);
    build_image(&src, &keys, "stable", &repo, &["--deltas", "0"]);
    gc0();
    assert!(!repo.join(&m.deltas[0].path).exists(), "an unreferenced delta stayed");
    assert!(!images[3].exists());
    // A corrupt manifest stops gc before it removes anything.
    fs::write(repo.join("broken.json"), b"{").unwrap();
    run_bin(
        "imgbuild",
        [OsStr::new("gc"), OsStr::new("--repo"), repo.as_os_str(), OsStr::new("--keep"), OsStr::new("0")],
    )
    .fails_with("broken.json");
    assert!(images[0].exists(), "beta's image must stay");
}

#[test]
fn inspect_shows_manifest_and_superblock() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    let keys = Keys::generate();
    let out =
        build_image(&src, &keys, "stable", &work.path().join("repo"), &["--version", "2026.11-web", "--level", "19"]);
    let i = run_bin("imgbuild", ["inspect", out["manifest"].as_str().unwrap(), "--json"]).ok().json();
    assert_eq!(i["manifest"]["version"], "2026.11-web");
    assert_eq!(i["superblock"]["compression_id"], 6);
    assert_eq!(i["superblock"]["block_size"], 131072);
    assert_eq!(i["superblock"]["inode_count"], 2);
    let text = run_bin("imgbuild", ["inspect", out["image"].as_str().unwrap()]).ok().stdout;
    assert!(text.contains("zstd compression, 128 KiB blocks, 2 inodes"), "{text}");
    run_bin("imgbuild", ["inspect", "/etc/hostname"]).fails_with("neither a squashfs image nor a valid manifest");
}
