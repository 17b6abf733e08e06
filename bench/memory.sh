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
bash scripts/setup-debian.sh
# BENCH_PROFILE=dev (debug binaries, optimised hashing) is for smoke runs only.
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder -p imgdeploy-deployer
bin=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)
work=$(mktemp -d /var/tmp/imgmem.XXXXXX)
chmod 755 "$work"   # the directory of `link`, which imgdeploy checks
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for m in "$work"/state/mnt/*; do umount "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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
port=$(free_port)
n=$work/nginx
mkdir "$n"
cat > "$n/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $n/nginx.pid; error_log $n/error.log;
events { worker_connections 64; }
http { access_log off; sendfile on;
  client_body_temp_path $n; proxy_temp_path $n; fastcgi_temp_path $n; uwsgi_temp_path $n; scgi_temp_path $n;
  server { listen 127.0.0.1:$port; root $work/srv; } }
NGINX
nginx -c "$n/nginx.conf" -p "$n" & pids+=($!)
sleep 1
cat > "$work/imgdeploy.toml" <<TOML
source = "http://127.0.0.1:$port/repo/bench.json"
trusted_keys = ["$work/k.pub"]
state_dir = "$work/state"
link = "$work/link"
drain_timeout = "1s"
TOML
build() { "$bin/imgbuild" -q build "$work/master" --key "$work/k.key" --channel bench --repo "$work/srv/repo" --level "${BENCH_LEVEL:-15}" --json; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
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
