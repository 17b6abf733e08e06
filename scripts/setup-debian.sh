#!/usr/bin/env bash
# Installs the Debian packages imgdeploy builds, tests and benchmarks with.
# Idempotent: apt-get only runs when something is missing. Needs root.
set -euo pipefail

packages=(
  build-essential pkg-config    # cc for -sys crates
  libsquashfs-dev               # squashfs-tools-ng 1.2: the image writer we bind
  squashfs-tools                # mksquashfs/unsquashfs: the independent oracle
  nginx                         # real static HTTP server for end-to-end tests
  openssl                       # cross-checks our Ed25519 PEM keys and signatures
  attr acl                      # setfattr/getfattr/setfacl for fixture trees
  util-linux                    # losetup, mount, setpriv, unshare
  time                          # /usr/bin/time -v: peak RSS in benchmarks
  curl bc                       # the peer pipeline in the deploy benchmark
  rsync casync zsync            # peers measured by bench/delta.sh
  xfsprogs btrfs-progs          # reflinks: BENCH_FS of bench/delta.sh and the e2e test of shared extents
  psmisc                        # fuser, for debugging busy mounts
  cpio binutils                 # initramfs checks; objcopy strips /init for netboot
  linux-image-amd64             # a real kernel and modules for the netboot qemu test
  qemu-system-x86               # boots the netboot artifacts (TCG)
  busybox-static                # /sbin/init of the netboot test image; udhcpc and ip for network mode
  mmdebstrap gpg e2fsprogs kmod # the Debian frontend VM of the field test (root fs, ext4 image, depmod)
  dpkg-dev                      # dpkg-shlibdeps: Depends of the .debs built by scripts/package-deb.sh
  cryptsetup-bin                # veritysetup: the independent oracle for our dm-verity hash trees
)

missing=()
for p in "${packages[@]}"; do
  [[ $p == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: missing Debian packages: ${missing[*]}; run this script as root (or: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The squashfs and loop drivers are needed for mounting; load them if they are modules.
if [[ $(id -u) -eq 0 ]]; then
  modprobe -q loop 2>/dev/null || true
  modprobe -q squashfs 2>/dev/null || true
fi

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (rustup) first" >&2; exit 1; }
