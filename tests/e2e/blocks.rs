//! Block maps and incremental builds: every block the map names is in the
//! image and recompresses, with the deployer's compressor, to the very
//! bytes there; every file can be put back together from the map; an
//! incremental build gives the same image as a build from scratch after
//! every kind of change, and never copies from an earlier image that is
//! corrupted, missing or differently compressed.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use imgdeploy_common::blockmap::{BlockKind, BlockMap, SPARSE};
use imgdeploy_common::compress::{decompress_block, BlockCompressor, METADATA_LEVEL};
use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::manifest::Manifest;
use imgdeploy_tests::{build_image, files_under, noise, run_bin, Keys};

/// Compressible, seed-dependent text.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = ["alpha ", "bravo ", "charlie ", "delta ", "echo ", "foxtrot ", "golf ", "hotel "];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 8) as usize].as_bytes());
        if x % 11 == 0 {
            out.extend_from_slice(format!("{}\n", x % 1000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

const BLOCK: usize = 128 * 1024;

fn sample_tree(src: &Path) {
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("big.txt"), text(5 * BLOCK + 1000, 1)).unwrap();
    fs::write(src.join("noise.bin"), noise(3 * BLOCK + 77, 2)).unwrap();
    let mut sparse = vec![0u8; 4 * BLOCK];
    sparse.extend_from_slice(b"end");
    fs::write(src.join("sparse"), sparse).unwrap();
    let mut mover = text(BLOCK, 3);
    mover.extend_from_slice(&noise(BLOCK, 4));
    mover.extend_from_slice(&text(BLOCK, 5));
    fs::write(src.join("mover"), mover).unwrap();
    for (i, c) in "abcdefghij".chars().enumerate() {
        fs::write(src.join("dir").join(c.to_string()), text(300 + i * 1500, 10 + i as u64)).unwrap();
    }
    fs::write(src.join("dir/empty"), b"").unwrap();
    xattr::set(src.join("big.txt"), "user.note", b"one").unwrap();
}

fn sha(out: &serde_json::Value) -> String {
    out["sha256"].as_str().unwrap().to_owned()
}

fn n(out: &serde_json::Value, key: &str) -> u64 {
    out[key].as_u64().unwrap_or_else(|| panic!("no {key} in {out}"))
}

/// The image built from scratch (`--no-reuse`, into a scratch repository).
fn scratch_build(src: &Path, keys: &Keys, extra: &[&str]) -> serde_json::Value {
    let repo = tempfile::tempdir().unwrap();
    let mut args = vec!["--no-reuse"];
    args.extend_from_slice(extra);
    let out = build_image(src, keys, "scratch", repo.path(), &args);
    assert_eq!(n(&out, "reused_bytes"), 0, "--no-reuse reused blocks: {out}");
    out
}

#[test]
fn incremental_builds_equal_builds_from_scratch_after_every_kind_of_change() {
    let work = tempfile::tempdir().unwrap();
    let (src, repo) = (work.path().join("src"), work.path().join("repo"));
    sample_tree(&src);
    let keys = Keys::generate();
    let first = build_image(&src, &keys, "stable", &repo, &[]);
    assert_eq!(n(&first, "reused_bytes"), 0, "nothing to reuse yet: {first}");
    assert!(n(&first, "compressed_bytes") >= 11 * BLOCK as u64, "{first}");

    type Change = Box<dyn Fn(&Path)>;
    let changes: Vec<(&str, Change)> = vec![
        ("unchanged", Box::new(|_| {})),
        (
            "edit in place",
            Box::new(|s| {
                let mut b = fs::read(s.join("big.txt")).unwrap();
                b[2 * BLOCK + 5..2 * BLOCK + 25].copy_from_slice(b"an edit in block two");
                fs::write(s.join("big.txt"), b).unwrap();
            }),
        ),
        (
            "append",
            Box::new(|s| {
                let mut b = fs::read(s.join("noise.bin")).unwrap();
                b.extend_from_slice(&noise(70_000, 9));
                fs::write(s.join("noise.bin"), b).unwrap();
            }),
        ),
        (
            "truncate",
            Box::new(|s| {
                fs::File::options().write(true).open(s.join("big.txt")).unwrap().set_len(3 * BLOCK as u64 + 10).unwrap()
            }),
        ),
        ("rename", Box::new(|s| fs::rename(s.join("dir/c"), s.join("dir/zz")).unwrap())),
        ("delete", Box::new(|s| fs::remove_file(s.join("dir/d")).unwrap())),
        ("new hardlink", Box::new(|s| fs::hard_link(s.join("mover"), s.join("dir/link")).unwrap())),
        ("xattr only", Box::new(|s| xattr::set(s.join("big.txt"), "user.note", b"two").unwrap())),
        (
            "a block moves to another file",
            Box::new(|s| {
                let mover = fs::read(s.join("mover")).unwrap();
                let mut moved = mover[BLOCK..2 * BLOCK].to_vec();
                moved.extend_from_slice(&text(5000, 77));
                fs::write(s.join("moved"), moved).unwrap();
                fs::remove_file(s.join("dir/link")).unwrap();
                fs::write(s.join("mover"), &mover[..BLOCK]).unwrap();
            }),
        ),
    ];
    for (what, change) in &changes {
        change(&src);
        let incremental = build_image(&src, &keys, "stable", &repo, &[]);
        let scratch = scratch_build(&src, &keys, &[]);
        assert_eq!(sha(&incremental), sha(&scratch), "{what}: the incremental image differs from a build from scratch");
        let (reused, compressed) = (n(&incremental, "reused_bytes"), n(&incremental, "compressed_bytes"));
        assert!(reused >= 8 * BLOCK as u64, "{what}: only {reused} bytes reused: {incremental}");
        assert!(compressed < 3 * BLOCK as u64, "{what}: {compressed} bytes compressed again: {incremental}");
        assert_eq!(n(&incremental, "rejected_blocks"), 0, "{what}");
    }
    // Another level compresses differently: nothing may be copied.
    let incremental = build_image(&src, &keys, "stable", &repo, &["--level", "5"]);
    let scratch = scratch_build(&src, &keys, &["--level", "5"]);
    assert_eq!(sha(&incremental), sha(&scratch), "level change");
    assert_eq!(n(&incremental, "reused_bytes"), 0, "blocks of a level-15 image reused at level 5: {incremental}");
}

/// The current image and block map of `channel` in `repo`.
fn current(repo: &Path, channel: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(repo.join(format!("{channel}.json"))).unwrap()).unwrap();
    (repo.join(m["image"]["path"].as_str().unwrap()), repo.join(m["block_map"]["path"].as_str().unwrap()))
}

#[test]
fn corrupted_or_missing_earlier_images_are_never_copied_from() {
    let work = tempfile::tempdir().unwrap();
    let (src, repo) = (work.path().join("src"), work.path().join("repo"));
    sample_tree(&src);
    let keys = Keys::generate();
    build_image(&src, &keys, "stable", &repo, &[]);
    let edit = |i: u64| fs::write(src.join(format!("dir/new{i}")), text(2000, 100 + i)).unwrap();
    let check = |what: &str| {
        let incremental = build_image(&src, &keys, "stable", &repo, &[]);
        let scratch = scratch_build(&src, &keys, &[]);
        assert_eq!(sha(&incremental), sha(&scratch), "{what}: the incremental image differs from a build from scratch");
        incremental
    };

    // One byte of the first data block of the current image changed in the bucket.
    let (image, _) = current(&repo, "stable");
    let mut bytes = fs::read(&image).unwrap();
    bytes[300] ^= 0x40;
    fs::write(&image, &bytes).unwrap();
    edit(1);
    let out = check("corrupted block");
    assert!(n(&out, "rejected_blocks") >= 1, "the corrupted block was not noticed: {out}");
    assert!(n(&out, "reused_bytes") > 0, "the intact blocks were not reused: {out}");

    // The current image is gone.
    let (image, _) = current(&repo, "stable");
    fs::remove_file(&image).unwrap();
    edit(2);
    let out = check("missing image");
    assert_eq!(n(&out, "reused_bytes"), 0, "{out}");

    // The current block map is corrupted (it no longer has its signed sha256).
    let (_, map) = current(&repo, "stable");
    let mut bytes = fs::read(&map).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&map, &bytes).unwrap();
    edit(3);
    let out = check("corrupted map");
    assert_eq!(n(&out, "reused_bytes"), 0, "{out}");

    // A block map swapped for another image's map (valid, but not the signed one).
    let (_, map) = current(&repo, "stable");
    let other = tempfile::tempdir().unwrap();
    fs::write(src.join("dir/new4"), b"other").unwrap();
    let o = build_image(&src, &keys, "other", other.path(), &[]);
    let (_, other_map) = current(other.path(), "other");
    fs::copy(other_map, &map).unwrap();
    let out = check("swapped map");
    assert_eq!(n(&out, "reused_bytes"), 0, "{out} (other build: {o})");

    // Whoever owns the bucket replaces image and map with a forgery that is
    // consistent in itself: the same content compressed at another level,
    // padded to the signed size, with a map claiming this build's compressor.
    // Copying from it would give an image no fresh build gives.
    let (image, map) = current(&repo, "stable");
    let forged = tempfile::tempdir().unwrap();
    build_image(&src, &keys, "forged", forged.path(), &["--level", "22"]);
    let (forged_image, forged_map) = current(forged.path(), "forged");
    let signed_size = fs::metadata(&image).unwrap().len();
    let mut bytes = fs::read(forged_image).unwrap();
    assert!(bytes.len() as u64 <= signed_size, "the level-22 forgery is larger than the image");
    bytes.resize(signed_size as usize, 0);
    let mut m = BlockMap::decode(&fs::read(forged_map).unwrap()).unwrap();
    m.compressor.level = 15;
    m.image_size = signed_size;
    fs::write(&image, bytes).unwrap();
    fs::write(&map, m.encode()).unwrap();
    fs::write(src.join("dir/new4"), b"forged").unwrap();
    let out = check("forged image and map");
    assert_eq!(n(&out, "reused_bytes"), 0, "{out}");

    // The next build, from a sound repository, reuses again.
    edit(5);
    let out = check("sound again");
    assert!(n(&out, "reused_bytes") > 8 * BLOCK as u64, "{out}");
}

/// Checks the map of the image `out` describes: every block is in the
/// image and recompresses to its bytes, and every file is put back
/// together from its blocks.
fn check_map(src: &Path, repo: &Path, channel: &str, level: u32) -> BlockMap {
    let (image, map_file) = current(repo, channel);
    let map = BlockMap::decode(&fs::read(&map_file).unwrap()).unwrap();
    let image = fs::read(&image).unwrap();
    let signed = Manifest::parse(&fs::read(repo.join(format!("{channel}.json"))).unwrap()).unwrap();
    assert_eq!(signed.image.size, image.len() as u64);
    assert_eq!(map.image_size, signed.image.data_size(), "the map covers the squashfs, not the hash tree");
    assert_eq!((map.compressor.level, map.compressor.metadata_level), (level, level.min(METADATA_LEVEL)));
    let u64_at = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
    let inode_table_start = u64_at(64);
    let mut data_compressor = BlockCompressor::new(level).unwrap();
    let mut metadata_compressor = BlockCompressor::new(level.min(METADATA_LEVEL)).unwrap();
    // Whether some metadata block's bytes are not what the data's level
    // makes: the metadata level is really used, not only recorded.
    let mut metadata_differs = false;
    let mut raws = Vec::with_capacity(map.blocks.len());
    let mut data_end = None::<u64>;
    for b in &map.blocks {
        let disk = &image[b.offset as usize..(b.offset + b.size as u64) as usize];
        assert_eq!(Sha256Digest::of_bytes(disk), b.disk_sha256, "block at {}", b.offset);
        let raw = if b.stored { disk.to_vec() } else { decompress_block(disk, b.raw_size as usize).unwrap() };
        assert_eq!(Sha256Digest::of_bytes(&raw), b.raw_sha256, "block at {}", b.offset);
        // The deployer's compressor gives the very bytes in the image, at
        // the level of the block's kind.
        let metadata = b.kind == BlockKind::Metadata;
        if metadata && !b.stored {
            metadata_differs |= data_compressor.pack(&raw).unwrap().0 != disk;
        }
        let compressor = if metadata { &mut metadata_compressor } else { &mut data_compressor };
        assert_eq!(
            compressor.pack(&raw).unwrap(),
            (disk.to_vec(), b.stored),
            "block at {} recompresses differently",
            b.offset
        );
        // Data and fragment blocks tile the data area with no gap.
        if b.offset < inode_table_start {
            if let Some(end) = data_end {
                assert_eq!(b.offset, end, "gap in the data area before {}", b.offset);
            }
            data_end = Some(b.offset + b.size as u64);
        } else {
            // A metadata block follows its 2-byte header.
            let h = u16::from_le_bytes(image[b.offset as usize - 2..b.offset as usize].try_into().unwrap());
            assert_eq!(
                ((h & 0x7fff) as u32, h & 0x8000 != 0),
                (b.size, b.stored),
                "metadata header before {}",
                b.offset
            );
        }
        raws.push(raw);
    }
    assert_eq!(data_end, Some(inode_table_start), "the data area is not covered up to the inode table");
    assert_eq!(metadata_differs, level > METADATA_LEVEL, "metadata blocks at level {level}");
    // Every regular file (one per inode) is in the map and rebuilds from it.
    let mut inodes = HashSet::new();
    let expected: Vec<_> = files_under(src)
        .into_iter()
        .filter(|p| {
            let md = fs::symlink_metadata(p).unwrap();
            md.is_file() && inodes.insert(md.ino())
        })
        .collect();
    assert_eq!(map.files.len(), expected.len(), "files in the map");
    for f in &map.files {
        let path = src.join(OsStr::new(std::str::from_utf8(&f.path).unwrap()));
        let mut content = Vec::with_capacity(f.size as usize);
        for &b in &f.blocks {
            if b == SPARSE {
                content.resize(content.len() + map.block_size as usize, 0);
            } else {
                content.extend_from_slice(&raws[b as usize]);
            }
        }
        if let Some(t) = f.tail {
            let rest = (f.size % map.block_size as u64) as usize;
            content.extend_from_slice(&raws[t.block as usize][t.offset as usize..t.offset as usize + rest]);
        }
        assert_eq!(content, fs::read(&path).unwrap(), "{} does not rebuild from its blocks", path.display());
    }
    map
}

#[test]
fn block_maps_name_every_block_and_recompress_to_the_image() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    fs::hard_link(src.join("mover"), src.join("dir/hardlink")).unwrap();
    fs::write(src.join("dir/copy-of-a"), fs::read(src.join("dir/a")).unwrap()).unwrap();
    let keys = Keys::generate();
    for (level, extra) in [(15, &[][..]), (3, &["--level", "3", "--no-fragments"][..])] {
        let repo = work.path().join(format!("repo-{level}"));
        build_image(&src, &keys, "stable", &repo, extra);
        let map = check_map(&src, &repo, "stable", level);
        let s = map.summary();
        assert!(s.data.blocks >= 11 && s.data.stored >= 3 && s.metadata.blocks >= 2, "{s:?}");
        assert_eq!(s.sparse_blocks, 4, "{s:?}");
        if extra.is_empty() {
            assert!(s.fragment.blocks >= 1 && s.files_with_tail >= 10, "{s:?}");
        } else {
            assert_eq!((s.fragment.blocks, s.files_with_tail), (0, 0), "{s:?}");
        }
        let text =
            run_bin("imgbuild", [OsStr::new("inspect"), OsStr::new("--blocks"), repo.join("stable.json").as_os_str()])
                .ok();
        assert!(
            text.stdout.contains(&format!(
                "block map: zstd {} level {level} (metadata {})",
                map.compressor.zstd_version,
                level.min(METADATA_LEVEL)
            )),
            "{}",
            text.stdout
        );
        let json = run_bin(
            "imgbuild",
            [OsStr::new("inspect"), OsStr::new("--blocks"), OsStr::new("--json"), repo.join("stable.json").as_os_str()],
        )
        .ok()
        .json();
        assert_eq!(json["blocks"]["data"]["blocks"], s.data.blocks, "{json}");
        // Without the map beside the manifest, --blocks says what to do.
        let (_, map_file) = current(&repo, "stable");
        fs::remove_file(map_file).unwrap();
        run_bin("imgbuild", [OsStr::new("inspect"), OsStr::new("--blocks"), repo.join("stable.json").as_os_str()])
            .fails_with("cannot open the block map");
    }
}
