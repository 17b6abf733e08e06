#!/usr/bin/env bash
# Measures how squashfs layout choices affect delta size: for each layout,
# build v1 of a tree, deploy it, change the tree, build v2, and ask
# `imgdeploy apply --dry-run` how many image bytes a chunk delta would fetch
# (v2 is built with `--deltas 0`: static deltas are measured by delta.sh).
#
#   bash bench/layout.sh [SRC]     default SRC: /usr/share (many small files)
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr/share}
# zstd level of every build (the delta's share barely depends on it; smoke runs use 3).
level=${BENCH_LEVEL:-15}
bash scripts/setup-debian.sh
# BENCH_PROFILE=dev (debug binaries, optimised hashing) is for smoke runs only.
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder -p imgdeploy-deployer
bin=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)
work=$(mktemp -d /var/tmp/imglayout.XXXXXX)
cleanup() { for m in "$work"/*/state/mnt/*; do umount "$m" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
"$bin/imgbuild" -q keygen --out "$work/k" >/dev/null
cp -a "$src" "$work/base"
echo "tree: $src, $(du -sh --apparent-size "$work/base" | cut -f1), $(find "$work/base" -type f | wc -l) files" >&2

# Scenarios, each applied to a fresh copy of the base tree.
small_file=$(find "$work/base" -type f -size -8k -size +1k | sort | awk '{last=$0} NR==1000 {pick=$0} END {print (pick != "" ? pick : last)}')
pkg_dir=$(cd "$work/base" && du -s --apparent-size -B1 */ 2>/dev/null | sort -n | awk -v total="$(du -s --apparent-size -B1 . | cut -f1)" '$1 > total/150 && $1 < total/50 {print $2; exit}')
scenario() { # name dir
  case $1 in
    a) printf '# local edit\n' >> "$2/${small_file#"$work/base/"}" ;;
    b) find "$2/$pkg_dir" -type f -exec sh -c 'for f; do head -c 64 /dev/urandom >> "$f"; done' sh {} + ;;
  esac
}
printf '%-14s %-3s %14s %14s %8s\n' layout chg "image bytes" "delta bytes" "share"
declare -A delta
for layout in fragments no-fragments; do
  flag=(); [[ $layout == no-fragments ]] && flag=(--no-fragments)
  for s in a b; do
    d=$work/$layout-$s; mkdir -p "$d"
    cp -a "$work/base" "$d/tree"
    "$bin/imgbuild" -q build "$d/tree" --key "$work/k.key" --channel c --repo "$d/repo" --level "$level" "${flag[@]}" >/dev/null
    printf 'source = "%s/repo/c.json"\ntrusted_keys = ["%s/k.pub"]\nstate_dir = "%s/state"\nlink = "%s/link"\n' "$d" "$work" "$d" "$d" > "$d/cfg.toml"
    "$bin/imgdeploy" -q -c "$d/cfg.toml" apply >/dev/null
    scenario "$s" "$d/tree"
    out=$("$bin/imgbuild" -q build "$d/tree" --key "$work/k.key" --channel c --repo "$d/repo" --level "$level" --deltas 0 "${flag[@]}" --json)
    size=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
    plan=$("$bin/imgdeploy" -q -c "$d/cfg.toml" apply --dry-run --json)
    dl=$(echo "$plan" | python3 -c 'import json,sys; print(json.load(sys.stdin)["download_bytes"])')
    printf '%-14s %-3s %14d %14d %7.2f%%\n' "$layout" "$s" "$size" "$dl" "$(echo "100*$dl/$size" | bc -l)"
    delta["$layout-$s"]=$dl
    for m in "$d"/state/mnt/*; do umount "$m" 2>/dev/null || true; done
    rm -rf "$d"
  done
done
awk -v fa="${delta[fragments-a]}" -v fb="${delta[fragments-b]}" -v na="${delta[no-fragments-a]}" -v nb="${delta[no-fragments-b]}" 'BEGIN {
  printf "ratio fragments/no-fragments delta bytes: (a) %.2fx  (b) %.2fx\n", fa/na, fb/nb }'
