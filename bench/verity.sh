#!/usr/bin/env bash
# Benchmark: reading a deployed tree through dm-verity (as `imgdeploy apply`
# mounts it) against the same image loop-mounted without it, in the same
# boot of the same kernel. Prints sequential (tar of the whole tree) and
# random (every file once, in a shuffled order) read throughput of both and
# the ratios (verity / plain; 1.0 means free).
#
# The host kernel here has no device-mapper, so this boots the Debian kernel
# in qemu with a busybox initramfs holding the image, the static imgdeploy
# (the netboot /init build) and the modules. qemu runs with TCG (emulated
# CPU, no KVM): SHA-256 and zstd are both emulated, so the ratio is what
# this says about dm-verity's share of the work, not a hardware figure.
#
#   bash bench/verity.sh [SRC]      default: /usr/share/doc
#   BENCH_RUNS=N (default 2): alternating passes of each mount; the best counts
#   BENCH_ACCEL=kvm: on a host where KVM works (not this one: it hangs)
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr/share/doc}
runs=${BENCH_RUNS:-2}
bash scripts/setup-debian.sh
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder
imgbuild=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)/imgbuild
init=${IMGDEPLOY_NETBOOT_INIT:-$(bash scripts/build-netboot-init.sh | tail -1)}
kver=$(ls /lib/modules | sort -V | tail -1)
kernel=/boot/vmlinuz-$kver
[[ -r $kernel ]] || { echo "error: $kernel not found; run scripts/setup-debian.sh (installs linux-image-amd64)" >&2; exit 1; }
work=$(mktemp -d /var/tmp/imgverity.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$imgbuild" -q keygen --out "$work/k" >/dev/null
"$imgbuild" -q build "$src" --key "$work/k.key" --channel bench --repo "$work/root/repo" --level "${BENCH_LEVEL:-15}" >/dev/null
image=$(ls "$work"/root/repo/images/*.squashfs)
echo "tree: $src ($(du -sh --apparent-size "$src" | cut -f1)), image $(stat -c %s "$image") bytes" >&2

r=$work/root
mkdir -p "$r"/{bin,dev,proc,sys,tmp,etc/imgdeploy,lib/modules,plain,webroot}
cp /bin/busybox "$r/bin/busybox"
cp "$init" "$r/bin/imgdeploy"
cp "$work/k.pub" "$r/etc/imgdeploy/bench.pub"
# sha256-ssse3 is the kernel's SHA-256 for x86 CPUs with SSSE3, AVX2 or SHA-NI:
# on a Debian frontend udev loads it by CPU feature at boot, and dm-verity
# takes the fastest SHA-256 the kernel has. Without it the VM would hash
# with sha256-generic, which no frontend uses.
for m in loop squashfs dm-verity sha256-ssse3; do
  modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' > "$work/modules"
while read -r ko; do cp "$ko" "$r/lib/modules/"; echo "insmod /lib/modules/$(basename "$ko")"; done < "$work/modules" > "$work/insmods"
cat > "$r/etc/imgdeploy/imgdeploy.toml" <<EOF
source = "/repo/bench.json"
trusted_keys = ["/etc/imgdeploy/bench.pub"]
state_dir = "/var/lib/imgdeploy"
link = "/webroot/tree"
EOF
{
  echo '#!/bin/busybox sh'
  echo '/bin/busybox --install -s /bin'
  echo 'export PATH=/bin'
  echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
  echo 'mkdir -p /var/lib; mount -t tmpfs tmp /tmp'
  cat "$work/insmods"
  cat <<'EOF'
say() { echo "BENCH $*" > /dev/ttyS0; }
imgdeploy -q apply > /tmp/apply.log 2>&1 || { say "FAIL apply: $(cat /tmp/apply.log)"; poweroff -f; }
imgdeploy status --json | grep -q '"integrity": "verity"' || { say "FAIL not mounted through dm-verity: $(imgdeploy status)"; poweroff -f; }
image=$(ls /repo/images/*.squashfs)
mount -t squashfs -o loop,ro "$image" /plain
find /plain -type f | sed 's|^/plain/||' | shuf > /tmp/files
bytes=$(tar -cf - -C /plain . | wc -c)
now() { cut -d' ' -f1 /proc/uptime; }
pass() { # name dir
  echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); tar -cf - -C "$2" . > /dev/null; t1=$(now)
  echo 3 > /proc/sys/vm/drop_caches
  t2=$(now); (cd "$2" && while read -r f; do cat "$f"; done < /tmp/files) > /dev/null; t3=$(now)
  say "$1 seq $t0 $t1 rand $t2 $t3"
}
say "bytes $bytes files $(wc -l < /tmp/files)"
say "sha256 $(awk '/^name/ { n = $3 } /^driver/ { d = $3 } /^priority/ && n == "sha256" { printf "%s(%s) ", d, $3 }' /proc/crypto)"
EOF
  for ((i = 1; i <= runs; i++)); do
    echo 'pass plain /plain'
    echo 'pass verity /webroot/tree'
  done
  echo 'say done; poweroff -f'
} > "$r/init"
chmod 755 "$r/init" "$r/bin/busybox" "$r/bin/imgdeploy"
(cd "$r" && find . | cpio -o -H newc --quiet) > "$work/initrd.cpio"

timeout 1800 qemu-system-x86_64 -accel "${BENCH_ACCEL:-tcg}" -cpu max -smp 2 -m 1536 -display none -nodefaults -no-reboot \
  -kernel "$kernel" -initrd "$work/initrd.cpio" -append "console=ttyS0 rdinit=/init quiet panic=-1" \
  -serial file:"$work/console" -netdev user,id=n0,restrict=on >/dev/null 2>&1 || true
grep -q "^BENCH done" "$work/console" || { tail -30 "$work/console" >&2; echo "error: the benchmark VM did not finish" >&2; exit 1; }
grep "^BENCH FAIL" "$work/console" >&2 && exit 1
sed -n 's/^BENCH sha256 /kernel SHA-256 drivers (priority): /p' "$work/console" >&2
awk '/^BENCH bytes/ { bytes = $3; files = $5 }
  /^BENCH (plain|verity) seq/ { s = $5 - $4; r = $8 - $7
    # /proc/uptime counts hundredths: a tiny smoke-test tree can read in less.
    if (s < 0.01) s = 0.01; if (r < 0.01) r = 0.01
    if (!($2 in seq) || s < seq[$2]) seq[$2] = s
    if (!($2 in rnd) || r < rnd[$2]) rnd[$2] = r }
  END {
    printf "%-8s %12s %12s\n", "mount", "seq MB/s", "random MB/s"
    for (m in seq) printf "%-8s %12.1f %12.1f\n", m, bytes / seq[m] / 1e6, bytes / rnd[m] / 1e6
    printf "%d bytes in %d files: ratio verity/plain throughput: sequential %.2fx  random %.2fx (qemu %s)\n",
      bytes, files, seq["plain"] / seq["verity"], rnd["plain"] / rnd["verity"], accel }' accel="${BENCH_ACCEL:-tcg}" "$work/console"
