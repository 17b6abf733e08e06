//! Links libsquashfs (squashfs-tools-ng 1.x, Debian's `libsquashfs-dev`).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBSQUASHFS_LIB_DIR");
    if let Ok(dir) = std::env::var("LIBSQUASHFS_LIB_DIR") {
        println!("cargo:rustc-link-search=native={dir}");
    }
    let found =
        std::path::Path::new("/usr/include/sqfs/super.h").exists() || std::env::var_os("LIBSQUASHFS_LIB_DIR").is_some();
    if !found {
        println!("cargo:warning=libsquashfs headers not found; install them with `apt-get install libsquashfs-dev`");
    }
    println!("cargo:rustc-link-lib=squashfs");
}
