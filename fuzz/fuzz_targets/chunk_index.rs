//! Chunk index parser (raw and zstd-compressed): never panics, never
//! allocates from unchecked counts, and what it accepts round-trips.
#![no_main]
use imgdeploy_common::chunk::ChunkIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = ChunkIndex::parse(data) {
        assert_eq!(ChunkIndex::parse(&idx.to_bytes()).expect("re-parses"), idx);
        assert_eq!(idx.chunks.iter().map(|c| c.len as u64).sum::<u64>(), idx.image_size);
    }
    let _ = ChunkIndex::decode(data);
});
