#!/usr/bin/env bash
# Benchmark: a full `imgdeploy apply` of a >= 1 GB image from nginx on
# 127.0.0.1 against two peer pipelines, in the same run:
#   - `curl -o FILE URL && sha256sum FILE` (download, then hash);
#   - `curl URL | tee FILE | openssl dgst -sha256` (hash while streaming, with
#     openssl's SHA instructions, as imgdeploy does).
# Prints wall times, throughput ratios (goal >= 0.8x each pipeline),
# imgdeploy's peak RSS (goal <= 64 MiB) and the switch time.
#
#   bash bench/deploy.sh [SIZE_MB]     default 1100
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${1:-1100}
bash scripts/setup-debian.sh
# BENCH_PROFILE=dev (debug binaries, optimised hashing) is for smoke runs only.
cargo build --profile "${BENCH_PROFILE:-release}" --locked -q -p imgdeploy-builder -p imgdeploy-deployer
bin=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)
# 0755 and root's: the directory of `link`, which imgdeploy checks.
work=$(mktemp -d /var/tmp/imgdeploy-bench.XXXXXX)
chmod 755 "$work"
nginx_pid=
cleanup() {
  [[ -n $nginx_pid ]] && { kill "$nginx_pid" 2>/dev/null; wait "$nginx_pid" 2>/dev/null; } || true
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

# nginx, started as root, chowns its temp paths to its worker user: they get
# a directory of their own, never the work directory that holds `link`.
mkdir "$work/nginx"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
n=$work/nginx
cat > "$n/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $n/nginx.pid; error_log $n/error.log;
events { worker_connections 64; }
http { access_log off; sendfile on; client_body_temp_path $n; proxy_temp_path $n; fastcgi_temp_path $n; uwsgi_temp_path $n; scgi_temp_path $n;
  server { listen 127.0.0.1:$port; root $work/repo; } }
NGINX
nginx -c "$n/nginx.conf" -p "$n" & nginx_pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
cat > "$work/imgdeploy.toml" <<TOML
source = "http://127.0.0.1:$port/bench.json"
trusted_keys = ["$work/k.pub"]
state_dir = "$work/state"
link = "$work/link"
TOML
url="http://127.0.0.1:$port/$image_rel"
# Warm the server's page cache once so every run reads the image from memory.
curl -sS -o /dev/null "$url"
now() { date +%s.%N; }

t0=$(now)
curl -sS -o "$work/curl.img" "$url" && sha256sum "$work/curl.img" >/dev/null
t1=$(now)
rm -f "$work/curl.img"
t2=$(now)
curl -sS "$url" | tee "$work/tee.img" | openssl dgst -sha256 >/dev/null
sync -f "$work/tee.img"
t3=$(now)
rm -f "$work/tee.img"
/usr/bin/time -f "%e %M" -o "$work/apply.time" "$bin/imgdeploy" -q -c "$work/imgdeploy.toml" apply --json > "$work/apply.json"
read -r at ar < "$work/apply.time"
sw=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["switch_micros"])' "$work/apply.json")
ct=$(echo "$t1 - $t0" | bc -l)
tt=$(echo "$t3 - $t2" | bc -l)
awk -v size="$size" -v ct="$ct" -v tt="$tt" -v at="$at" -v ar="$ar" -v sw="$sw" 'BEGIN {
  printf "image: %d bytes\n", size
  printf "curl -o + sha256sum          : %7.2f s  %7.1f MB/s\n", ct, size/ct/1e6
  printf "curl | tee | openssl dgst    : %7.2f s  %7.1f MB/s  (file synced)\n", tt, size/tt/1e6
  printf "imgdeploy apply              : %7.2f s  %7.1f MB/s  (download+verify+fsync+mount+switch)\n", at, size/at/1e6
  printf "ratio imgdeploy/pipeline throughput: %.2fx (curl+sha256sum) %.2fx (curl|tee|openssl)   imgdeploy peak RSS: %d MiB   switch: %d us\n", ct/at, tt/at, ar/1024, sw }'
