//! The checked-in completions and man pages match the current command lines.

use std::path::Path;

#[test]
fn docs_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for (rel, bytes) in imgdeploy_tests::docs::generate() {
        if std::fs::read(root.join(&rel)).ok().as_deref() != Some(&bytes[..]) {
            stale.push(rel.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated docs: {stale:?}; run `cargo run -p imgdeploy-tests --bin gen-docs` and commit doc/"
    );
}
