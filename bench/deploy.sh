#!/usr/bin/env bash
# Benchmark: a full `imgdeploy apply` of a >= 1 GB image from nginx on
# 127.0.0.1 against the pipeline `curl -o FILE URL && sha256sum FILE`, in the
# same run. Prints wall times, throughput ratio (goal >= 0.8x the pipeline),
# imgdeploy's peak RSS (goal <= 64 MiB) and the switch time.
#
#   bash bench/deploy.sh [SIZE_MB]     default 1100
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${1:-1100}
bash scripts/setup-debian.sh
cargo build --release --locked -q -p imgdeploy-builder -p imgdeploy-deployer
bin=$PWD/target/release
work=$(mktemp -d /var/tmp/imgdeploy-bench.XXXXXX)
nginx_pid=
cleanup() {
  [[ -n $nginx_pid ]] && kill "$nginx_pid" 2>/dev/null || true
  for m in "$work"/state/mnt/a "$work"/state/mnt/b; do umount "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# An incompressible tree of 1 MiB files, so the image is as large as the data.
mkdir -p "$work/tree"
for i in $(seq 1 "$size_mb"); do head -c 1048576 /dev/urandom > "$work/tree/f$i"; done
"$bin/imgbuild" -q keygen --out "$work/k" >/dev/null
"$bin/imgbuild" -q build "$work/tree" --key "$work/k.key" --channel bench --repo "$work/repo" --level 1 --json > "$work/build.json"
image_rel=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("images/"+d["sha256"]+".squashfs")' "$work/build.json")
size=$(stat -c %s "$work/repo/$image_rel")
rm -rf "$work/tree"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx-error.log;
events { worker_connections 64; }
http { access_log off; sendfile on; client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 127.0.0.1:$port; root $work/repo; } }
NGINX
nginx -c "$work/nginx.conf" -p "$work" & nginx_pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
cat > "$work/imgdeploy.toml" <<TOML
source = "http://127.0.0.1:$port/bench.json"
trusted_keys = ["$work/k.pub"]
state_dir = "$work/state"
link = "$work/link"
TOML
# Warm the server's page cache once so both runs read the image from memory.
curl -sS -o /dev/null "http://127.0.0.1:$port/$image_rel"

t0=$(date +%s.%N)
curl -sS -o "$work/curl.img" "http://127.0.0.1:$port/$image_rel" && sha256sum "$work/curl.img" >/dev/null
t1=$(date +%s.%N)
rm -f "$work/curl.img"
/usr/bin/time -f "%e %M" -o "$work/apply.time" "$bin/imgdeploy" -q -c "$work/imgdeploy.toml" apply --json > "$work/apply.json"
read -r at ar < "$work/apply.time"
sw=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["switch_micros"])' "$work/apply.json")
ct=$(echo "$t1 - $t0" | bc -l)
awk -v size="$size" -v ct="$ct" -v at="$at" -v ar="$ar" -v sw="$sw" 'BEGIN {
  printf "image: %d bytes\n", size
  printf "curl -o + sha256sum : %7.2f s  %7.1f MB/s\n", ct, size/ct/1e6
  printf "imgdeploy apply     : %7.2f s  %7.1f MB/s  (download+verify+mount+switch)\n", at, size/at/1e6
  printf "ratio imgdeploy/pipeline throughput: %.2fx   imgdeploy peak RSS: %d MiB   switch: %d us\n", ct/at, ar/1024, sw }'
