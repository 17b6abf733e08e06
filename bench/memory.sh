#!/usr/bin/env bash
# The deployer's peak memory against issue 14's bound (64 MiB for any image
# size): `imgdeploy apply` of a large image of incompressible files, first a
# full download, then a static delta after 4 KiB of one file changed. Peak
# RSS by /usr/bin/time; nginx on 127.0.0.1 serves the repository.
#
#   bash bench/memory.sh [MiB]   default: 3072 (an image of about 3.2 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-3072}
source bench/lib.sh
bench_binaries -p imgdeploy-builder -p imgdeploy-deployer
bench_workdir imgmem

mkdir -p "$work/master" "$work/srv"
# Files of up to 128 MiB of random bytes: every block is stored as it is.
left=$mib i=0
while ((left > 0)); do
  n=$((left < 128 ? left : 128)); i=$((i + 1))
  mkdir -p "$work/master/d$((i % 4))"
  head -c "${n}M" /dev/urandom > "$work/master/d$((i % 4))/f$i"
  left=$((left - n))
done
"$bin/imgbuild" -q keygen --out "$work/k" >/dev/null
serve_static "$work/srv" "access_log off;"
sleep 1
bench_deployer
# Peak RSS in KiB of one apply; its JSON outcome in $work/apply.json.
apply_rss() {
  /usr/bin/time -f '%M' -o "$work/rss" "$bin/imgdeploy" -q -c "$work/imgdeploy.toml" apply --json > "$work/apply.json"
  cat "$work/rss"
}
size=$(build | field '["size"]')
full=$(apply_rss)
echo "image: $size bytes; full download: mode $(field '["download"]["mode"]' < "$work/apply.json"), peak RSS $((full / 1024)) MiB" >&2
f=$(find "$work/master" -type f | sort | head -n 1)
head -c 4096 /dev/urandom | dd of="$f" bs=4096 seek=7 conv=notrunc status=none
build >/dev/null
delta=$(apply_rss)
mode=$(field '["download"]["mode"]' < "$work/apply.json")
echo "4 KiB changed: mode $mode, peak RSS $((delta / 1024)) MiB" >&2
[[ $mode == static-delta ]] || { echo "error: the second apply took no static delta ($mode)" >&2; exit 1; }
peak=$((full > delta ? full : delta))
echo "ratio peak RSS / 64 MiB bound: $(echo "$peak / 65536" | bc -l | xargs printf '%.2f')x (image $size bytes)"
