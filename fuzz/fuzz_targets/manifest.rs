//! Manifest parser and the signed-manifest path: never panics, and anything
//! it accepts re-serialises to bytes it accepts again.
#![no_main]
use imgdeploy_common::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let again = Manifest::parse(&m.to_bytes()).expect("a parsed manifest re-parses");
        assert_eq!(again, m);
    }
    // The superblock parser sees untrusted image heads too.
    let _ = imgdeploy_common::squashfs::Superblock::parse(data);
});
