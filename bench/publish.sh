#!/usr/bin/env bash
# What static deltas cost CI: `imgbuild build` of a large tree four times in
# one repository, with 4 KiB overwritten at one third of every 100th file
# between builds, so the last build makes K=3 deltas (from each of the three
# earlier images). Prints each build's wall time, the part of it spent
# making and checking its deltas, and their sizes, beside the same build
# with `--deltas 0` of the same tree into a copy of the repository.
#
#   bash bench/publish.sh [SRC]   default: /usr
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr}
bash scripts/setup-debian.sh
# BENCH_PROFILE=dev (debug binaries, optimised hashing) is for smoke runs only.
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder
bin=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)
work=$(mktemp -d /var/tmp/imgpub.XXXXXX)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
cp -a "$src" "$work/master"
echo "tree: $src: $(du -sh --apparent-size "$work/master" | cut -f1), $(find "$work/master" -type f | wc -l) files; $(nproc) cores" >&2
"$bin/imgbuild" -q keygen --out "$work/k" >/dev/null
build() { "$bin/imgbuild" -q build "$work/master" --key "$work/k.key" --channel bench --repo "$1" --level "${BENCH_LEVEL:-15}" --json "${@:2}"; }
change() {
  find "$work/master" -type f | sort | awk -v k="$1" 'NR % 100 == k' | while read -r f; do
    s=$(stat -c %s "$f"); [ "$s" -gt 0 ] || continue
    head -c $((s < 4096 ? s : 4096)) /dev/urandom | dd of="$f" bs=1 seek=$((s / 3)) conv=notrunc status=none
  done
}
printf '%-6s %10s %12s %s\n' build "wall s" "deltas s" "delta sizes (bytes)"
for i in 1 2 3 4; do
  ((i == 1)) || change "$i"
  if ((i == 4)); then
    # The same build without deltas, into a copy of the repository: the baseline.
    cp -a "$work/repo" "$work/repo0"
    t0=$(now); build "$work/repo0" --deltas 0 > /dev/null; t1=$(now)
    base=$(echo "$t1 - $t0" | bc -l)
    rm -rf "$work/repo0"
  fi
  t0=$(now); out=$(build "$work/repo"); t1=$(now)
  wall=$(echo "$t1 - $t0" | bc -l)
  echo "$out" > "$work/build$i.json"
  read -r ms sizes < <(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(r["deltas_ms"], " ".join(str(d["size"]) for d in r["deltas"]) or "-")' "$work/build$i.json")
  printf '%-6s %10.1f %12.1f %s\n' "$i" "$wall" "$(echo "$ms / 1000" | bc -l)" "$sizes"
done
echo "build 4 without deltas: $(printf '%.1f' "$base") s; with 3 deltas: $(printf '%.1f' "$wall") s"
echo "ratio build time with 3 deltas / without: $(echo "$wall / $base" | bc -l | xargs printf '%.2f')x"
