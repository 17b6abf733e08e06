#!/usr/bin/env bash
# Benchmark: `imgbuild build` against `mksquashfs -comp zstd -Xcompression-level 15`
# followed by `veritysetup format` (the same job: imgbuild appends a dm-verity
# tree too) on the same tree, in the same run. Prints wall time, image size and peak RSS of
# both and the ratios (imgbuild / mksquashfs; below 1.0 is better).
#
# Then the incremental build: one file edited and one directory holding about
# 1% of the bytes rewritten (on an overlay, the tree itself is not touched);
# `imgbuild build` into the same repository (copying the blocks of the first
# image) against `imgbuild build --no-reuse` of the same edited tree, which
# must give the same image.
#
#   bash bench/build.sh [SRC...]     default: /usr/share and /usr (5 GB, >100k files here)
#   BENCH_RUNS=N (default 2): full builds of each tool, alternating; the best time counts
set -euo pipefail
cd "$(dirname "$0")/.."
srcs=("$@"); ((${#srcs[@]})) || srcs=(/usr/share /usr)
source bench/lib.sh
# zstd level for both tools (15 is what the figures use; smoke runs use 3).
level=${BENCH_LEVEL:-15}
bash scripts/setup-debian.sh
# BENCH_PROFILE=dev (debug binaries, optimised hashing) is for smoke runs only.
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder
imgbuild=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)/imgbuild
work=$(mktemp -d /var/tmp/imgbench.XXXXXX)
"$imgbuild" -q keygen --out "$work/k" >/dev/null

measure() { # name, command...
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" >"$work/$name.out" 2>"$work/$name.err" || { cat "$work/$name.err" >&2; exit 1; }
}
cleanup() { umountall; rm -rf "$work"; }
umountall() { mountpoint -q "$work/merged" 2>/dev/null && umount "$work/merged"; rm -rf "$work/upper" "$work/ovl"; }
trap cleanup EXIT
for src in "${srcs[@]}"; do
  umountall
  mkdir -p "$work/merged" "$work/upper" "$work/ovl"
  mount -t overlay overlay -o "lowerdir=$src,upperdir=$work/upper,workdir=$work/ovl" "$work/merged"
  echo "tree: $src ($(du -sh --apparent-size "$src" 2>/dev/null | cut -f1), $(find "$src" -xdev | wc -l) entries), $(nproc) cores" >&2
  rm -rf "$work/repo" "$work/scratch" "$work/mksquashfs.img"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  # Warm the page cache once so neither tool pays for the first read.
  tar -cf - -C "$src" . 2>/dev/null | cat >/dev/null || true
  # Best of BENCH_RUNS alternating runs of each tool: this machine's speed
  # drifts by 10-15% between runs, more than the difference measured.
  mt= it= mr=0 ir=0
  for ((run = 1; run <= ${BENCH_RUNS:-2}; run++)); do
    rm -rf "$work/repo" "$work/mksquashfs.img"
    # The peer does the same job: the squashfs, then its dm-verity tree
    # appended by veritysetup (as imgbuild appends its own).
    measure mksquashfs sh -c 'mksquashfs "$1" "$2" -comp zstd -Xcompression-level "$3" -b 131072 -noappend -no-progress -quiet &&
      veritysetup format "$2" "$2" --hash-offset="$(stat -c %s "$2")" >/dev/null' sh "$work/merged" "$work/mksquashfs.img" "$level"
    measure imgbuild "$imgbuild" -q build "$work/merged" --key "$work/k.key" --channel bench --repo "$work/repo" --level "$level" --json
    read -r t r < "$work/mksquashfs.time"
    mt=$(smaller "$mt" "$t")
    ((r > mr)) && mr=$r
    read -r t r < "$work/imgbuild.time"
    it=$(smaller "$it" "$t")
    ((r > ir)) && ir=$r
    echo "run $run: mksquashfs $(cut -d' ' -f1 "$work/mksquashfs.time") s, imgbuild $(cut -d' ' -f1 "$work/imgbuild.time") s" >&2
  done
  ms=$(stat -c %s "$work/mksquashfs.img")
  is=$(stat -c %s "$work"/repo/images/*.squashfs)
  printf '%-12s %10s %14s %12s\n' tool "wall s" "image bytes" "peak RSS MiB"
  printf '%-12s %10s %14s %12s\n' mksquashfs "$mt" "$ms" "$((mr / 1024))"
  printf '%-12s %10s %14s %12s\n' imgbuild "$it" "$is" "$((ir / 1024))"
  awk -v src="$src" -v it="$it" -v mt="$mt" -v is="$is" -v ms="$ms" -v ir="$ir" -v mr="$mr" 'BEGIN {
    printf "%s: ratio imgbuild/mksquashfs: time %.2fx  size %.3fx  peak RSS %.3fx (%d MiB)\n", src, it/mt, is/ms, ir/mr, ir/1024 }'
  # The dm-verity hash tree (part of imgbuild's time and size above; the
  # last run's): its share of the build time and of the image.
  vfield() { grep -o "\"$1\": *[0-9]*" "$work/imgbuild.out" | grep -o '[0-9]*$'; }
  awk -v src="$src" -v ms="$(vfield verity_ms)" -v vb="$(vfield verity_bytes)" -v is="$is" \
    -v t="$(cut -d' ' -f1 "$work/imgbuild.time")" 'BEGIN {
    printf "%s: dm-verity tree: %.2f s of the %.2f s build (%.1f%%), %d bytes (+%.2f%% image size)\n", src, ms/1000, t, 100*ms/1000/t, vb, 100*vb/(is-vb) }'

  # The change: one edited file, and a directory of about 1% of the bytes
  # rewritten (one byte put in front of every file, so every block differs).
  total=$(du -s --apparent-size --block-size=1 -x "$work/merged" | cut -f1)
  edited=$(find "$work/merged" -xdev -type f -size +8k -print -quit)
  echo "# edited by bench/build.sh" >> "$edited"
  dir=$(du -x --apparent-size --block-size=1 "$work/merged" 2>/dev/null | awk -v t="$total" '
    { d = $1 - t / 100; if (d < 0) d = -d; if (best == "" || d < best) { best = d; path = $2 } } END { print path }')
  find "$dir" -xdev -type f -print0 | while IFS= read -r -d '' f; do
    { printf x; cat "$f"; } > "$work/rewrite" && cat "$work/rewrite" > "$f"
  done
  rewritten=$(du -s --apparent-size --block-size=1 -x "$dir" | cut -f1)
  echo "changed: $edited, and every file under $dir ($rewritten of $total bytes)" >&2
  measure incremental "$imgbuild" -q build "$work/merged" --key "$work/k.key" --channel bench --repo "$work/repo" --level "$level" --json
  measure scratch "$imgbuild" -q build "$work/merged" --key "$work/k.key" --channel bench --repo "$work/scratch" --level "$level" --no-reuse
  read -r nt nr < "$work/incremental.time"
  read -r st sr < "$work/scratch.time"
  # The first sha256 of a manifest is its image's.
  image_sha() { grep -m1 -o '"sha256": *"[0-9a-f]*"' "$1" | grep -o '[0-9a-f]\{64\}'; }
  field() { grep -o "\"$1\": *[0-9]*" "$work/incremental.out" | grep -o '[0-9]*$'; }
  a=$(image_sha "$work/repo/bench.json")
  b=$(image_sha "$work/scratch/bench.json")
  [[ $a == "$b" ]] || { echo "incremental image $a differs from the build from scratch $b" >&2; exit 1; }
  printf '%-12s %10s %12s\n' build "wall s" "peak RSS MiB"
  printf '%-12s %10s %12s\n' no-reuse "$st" "$((sr / 1024))"
  printf '%-12s %10s %12s\n' incremental "$nt" "$((nr / 1024))"
  echo "incremental: $(field reused_bytes) bytes reused, $(field compressed_bytes) compressed" >&2
  awk -v src="$src" -v nt="$nt" -v st="$st" -v p="$(awk -v r="$rewritten" -v t="$total" 'BEGIN { printf "%.1f", 100 * r / t }')" 'BEGIN {
    printf "%s: incremental/full build after %s%% rewritten: time %.3fx, identical image\n", src, p, nt/st }'
done
