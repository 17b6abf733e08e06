//! PEM key parsers and signature verification on arbitrary input.
#![no_main]
use std::path::Path;

use imgdeploy_common::sign::{verify_any, PrivateKey, PublicKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = PrivateKey::from_pem(&text, Path::new("fuzz"));
    if let Ok(k) = PublicKey::from_pem(&text, Path::new("fuzz")) {
        let _ = verify_any(&[k], b"message", data);
    }
    // A fixed, valid key against arbitrary signatures and messages.
    const PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA0F/F62y1EYKY0FU8Ss/7hdTaZdSBzCl6RC7RWnVuubs=\n-----END PUBLIC KEY-----\n";
    let k = PublicKey::from_pem(PEM, Path::new("fixed")).expect("valid test public key");
    let (msg, sig) = data.split_at(data.len().saturating_sub(64));
    let _ = verify_any(std::slice::from_ref(&k), msg, sig);
});
