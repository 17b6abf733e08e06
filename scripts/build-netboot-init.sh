#!/usr/bin/env bash
# Builds the /init that `imgbuild netboot` packs: imgdeploy linked statically
# (glibc, crt-static), so no file in an archive loaded beside the trusted
# initrd (an /etc/ld.so.preload, a library in a glibc-hwcaps directory) can
# run code as PID 1 before the signature is checked. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/netboot-init \
  cargo build --release --locked -p imgdeploy-deployer --bin imgdeploy --target "$target" >&2
out=target/netboot-init/$target/release/imgdeploy
if ldd "$out" 2>&1 | grep -q '=>'; then
  echo "error: $out is dynamically linked; is libc6-dev (libc.a) installed?" >&2
  exit 1
fi
realpath "$out"
