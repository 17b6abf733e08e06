#!/usr/bin/env bash
# Benchmark: `imgbuild build` against `mksquashfs -comp zstd -Xcompression-level 15`
# on the same tree, in the same run. Prints wall time, image size and peak RSS of
# both and the ratios (imgbuild / mksquashfs; below 1.0 is better).
#
#   bash bench/build.sh [SRC...]     default: /usr/share and /usr (5 GB, >100k files here)
set -euo pipefail
cd "$(dirname "$0")/.."
srcs=("$@"); ((${#srcs[@]})) || srcs=(/usr/share /usr)
# zstd level for both tools (15 is what the figures use; smoke runs use 3).
level=${BENCH_LEVEL:-15}
bash scripts/setup-debian.sh
# BENCH_PROFILE=dev (debug binaries, optimised hashing) is for smoke runs only.
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder
imgbuild=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)/imgbuild
work=$(mktemp -d /var/tmp/imgbench.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$imgbuild" -q keygen --out "$work/k" >/dev/null

measure() { # name, command...
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" >/dev/null 2>"$work/$name.err" || { cat "$work/$name.err" >&2; exit 1; }
}
for src in "${srcs[@]}"; do
  echo "tree: $src ($(du -sh --apparent-size "$src" 2>/dev/null | cut -f1), $(find "$src" -xdev | wc -l) entries), $(nproc) cores" >&2
  rm -rf "$work/repo" "$work/mksquashfs.img"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  # Warm the page cache once so neither tool pays for the first read.
  tar -cf - -C "$src" . 2>/dev/null | cat >/dev/null || true
  measure mksquashfs mksquashfs "$src" "$work/mksquashfs.img" -comp zstd -Xcompression-level "$level" -b 131072 -noappend -no-progress -quiet
  measure imgbuild "$imgbuild" -q build "$src" --key "$work/k.key" --channel bench --repo "$work/repo" --level "$level"
  read -r mt mr < "$work/mksquashfs.time"
  read -r it ir < "$work/imgbuild.time"
  ms=$(stat -c %s "$work/mksquashfs.img")
  is=$(stat -c %s "$work"/repo/images/*.squashfs)
  printf '%-12s %10s %14s %12s\n' tool "wall s" "image bytes" "peak RSS MiB"
  printf '%-12s %10s %14s %12s\n' mksquashfs "$mt" "$ms" "$((mr / 1024))"
  printf '%-12s %10s %14s %12s\n' imgbuild "$it" "$is" "$((ir / 1024))"
  awk -v src="$src" -v it="$it" -v mt="$mt" -v is="$is" -v ms="$ms" -v ir="$ir" -v mr="$mr" 'BEGIN {
    printf "%s: ratio imgbuild/mksquashfs: time %.2fx  size %.3fx  peak RSS %.3fx (%d MiB)\n", src, it/mt, is/ms, ir/mr, ir/1024 }'
done
