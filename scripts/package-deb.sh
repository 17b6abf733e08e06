#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:
#   imgdeploy_<version>_amd64.deb  (the frontend: binary, systemd units, config, man pages, completions)
#   imgbuild_<version>_amd64.deb   (the CI side, with the static /init for netboot)
# with cargo-deb (installed from crates.io when missing). Depends are
# computed by dpkg-shlibdeps from the libraries the binaries really link.
# Install on a frontend with: apt-get install ./target/debian/imgdeploy_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."

command -v dpkg-shlibdeps >/dev/null || { echo "error: dpkg-shlibdeps not found; run scripts/setup-debian.sh (installs dpkg-dev)" >&2; exit 1; }
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb from crates.io" >&2
  cargo install --locked cargo-deb@3.8.0 >&2
fi

cargo build --release --locked -p imgdeploy-deployer -p imgdeploy-builder
bash scripts/build-netboot-init.sh >/dev/null   # /usr/lib/imgdeploy/netboot-init in imgbuild
mkdir -p target/debian
for p in imgdeploy-deployer imgdeploy-builder; do
  cargo deb --no-build --locked -p "$p" --output target/debian/ >/dev/null
done
ls -1 target/debian/*.deb
