//! The deployer's TOML config and state-file parsers on arbitrary input.
#![no_main]
use std::path::Path;

use imgdeploy_deployer::config::Config;
use imgdeploy_deployer::state::State;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("/etc/imgdeploy/imgdeploy.toml"));
    }
    let _ = State::parse(data);
});
