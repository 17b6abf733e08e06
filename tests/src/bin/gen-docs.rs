//! Regenerates `doc/` (shell completions and man pages): `cargo run -p imgdeploy-tests --bin gen-docs`.
fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    imgdeploy_tests::docs::write(&root)?;
    eprintln!("wrote {}/doc", root.display());
    Ok(())
}
