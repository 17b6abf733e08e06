//! Static delta reader and applier: never panic, never allocate from an
//! unchecked length, never write past the output the header declares.
//! Fed twice: as the file itself (the zstd layer), and wrapped in a valid
//! zstd frame (the op layer), applied to an old image made of the same bytes.
#![no_main]
use std::os::unix::fs::FileExt;

use imgdeploy_common::sdelta::{apply, DeltaReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = DeltaReader::new(data) {
        while let Ok(Some(_)) = r.next_op() {}
    }
    let framed = zstd::encode_all(data, 1).expect("compressing into memory");
    let Ok(mut r) = DeltaReader::new(&framed[..]) else { return };
    let limit = r.header().out_size;
    let old = tempfile::tempfile().expect("temp file");
    old.write_all_at(data, 0).expect("writing the old image");
    let out = tempfile::tempfile().expect("temp file");
    if let Ok(stats) = apply(&mut r, &old, &out, &|_| ()) {
        assert!(stats.copied + stats.patched + stats.literal + stats.unreproduced_bytes == limit);
        assert!(out.metadata().expect("stat").len() <= limit);
    }
});
