//! multipart/byteranges parser: never panics, never reads a line past its
//! bound, and every part it yields is a valid inclusive range.
#![no_main]
use std::io::Read;

use imgdeploy_common::multipart::Parts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = Parts::multipart(data, "B");
    // Each part consumes at least one delimiter line, so the body bounds the count.
    for _ in 0..=data.len() {
        match parts.next_part() {
            Ok(Some((a, b))) => {
                assert!(a <= b);
                // Read the part's bytes as the deployer does, bounded by what is there.
                let len = (b - a).saturating_add(1).min(data.len() as u64);
                let _ = std::io::copy(&mut parts.body().take(len), &mut std::io::sink());
            }
            Ok(None) | Err(_) => return,
        }
    }
    panic!("more parts than lines in the body");
});
