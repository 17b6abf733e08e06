//! Block map parser (raw and zstd-compressed): never panics, never
//! allocates from unchecked counts, and what it accepts round-trips with
//! every file's blocks inside the map.
#![no_main]
use imgdeploy_common::blockmap::{BlockMap, SPARSE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = BlockMap::parse(data) {
        assert_eq!(BlockMap::parse(&map.to_bytes()).expect("re-parses"), map);
        for f in &map.files {
            assert!(f.blocks.iter().all(|&b| b == SPARSE || (b as usize) < map.blocks.len()));
        }
        assert!(map.blocks.iter().all(|b| b.offset + b.size as u64 <= map.image_size));
        let _ = map.summary();
    }
    let _ = BlockMap::decode(data);
});
