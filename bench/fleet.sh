#!/usr/bin/env bash
# Benchmark: N frontends take one update, in the same run:
#   - imgdeploy: each frontend applies through one caching nginx edge in
#     front of the origin (the layout the README recommends for fleets);
#   - rsync: each frontend pulls the tree from an rsync daemon on the master
#     (the status quo; rsync has no shared cache, so the master serves all).
# The update is "one package replaced" (about 1% of the bytes rewritten).
# Prints the bytes the origin served and the fleet's wall time for both, and
# the ratios. Frontends run 4 at a time (2 cores here).
#
#   bash bench/fleet.sh [N] [SRC]      default: 20 /usr/share
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
src=${2:-/usr/share}
source bench/lib.sh
bench_binaries -p imgdeploy-builder -p imgdeploy-deployer
bench_workdir imgfleet   # holds every frontend's `link`
now() { date +%s.%N; }

cp -a "$src" "$work/master"
echo "tree: $src: $(du -sh --apparent-size "$work/master" | cut -f1), $(find "$work/master" -type f | wc -l) files; $n frontends; $(nproc) cores" >&2
"$bin/imgbuild" -q keygen --out "$work/k" >/dev/null
build() { "$bin/imgbuild" -q build "$work/master" --key "$work/k.key" --channel stable --repo "$work/repo" >/dev/null; }
build

# Origin and edge; nginx's temp paths in directories of their own.
oport=$(free_port); eport=$(free_port)
mkdir -p "$work/nginx-origin" "$work/nginx-edge/cache"
cat > "$work/nginx-origin/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $work/nginx-origin/pid; error_log $work/nginx-origin/error.log;
events { worker_connections 512; }
http { log_format f '\$request_uri \$status \$body_bytes_sent'; access_log $work/origin.log f; sendfile on;
  client_body_temp_path $work/nginx-origin; proxy_temp_path $work/nginx-origin; fastcgi_temp_path $work/nginx-origin; uwsgi_temp_path $work/nginx-origin; scgi_temp_path $work/nginx-origin;
  server { listen 127.0.0.1:$oport; root $work/repo; } }
NGINX
e=$work/nginx-edge
cat > "$e/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $e/pid; error_log $e/error.log;
events { worker_connections 512; }
http { log_format f '\$request_uri \$status \$body_bytes_sent'; access_log $work/edge.log f; sendfile on;
  client_body_temp_path $e; proxy_temp_path $e; fastcgi_temp_path $e; uwsgi_temp_path $e; scgi_temp_path $e;
  proxy_cache_path $e/cache levels=1:2 keys_zone=img:10m max_size=4g inactive=1d use_temp_path=off;
  server { listen 127.0.0.1:$eport;
    proxy_http_version 1.1; proxy_cache img; proxy_cache_lock on; proxy_cache_lock_timeout 120s; proxy_cache_lock_age 120s;
    location /images/ { proxy_pass http://127.0.0.1:$oport; proxy_cache_valid 200 30d; }
    location /indexes/ { proxy_pass http://127.0.0.1:$oport; proxy_cache_valid 200 30d; }
    location / { proxy_pass http://127.0.0.1:$oport; proxy_cache_valid 200 5s; } } }
NGINX
nginx -c "$work/nginx-origin/nginx.conf" -p "$work/nginx-origin" & pids+=($!)
nginx -c "$e/nginx.conf" -p "$e" & pids+=($!)
rport=$(free_port)
printf 'use chroot = no\nnumeric ids = yes\nmax connections = 0\n[tree]\npath = %s/master\nread only = yes\nuid = root\ngid = root\n' "$work" > "$work/rsyncd.conf"
rsync --daemon --no-detach --port="$rport" --address=127.0.0.1 --config="$work/rsyncd.conf" --log-file="$work/rsyncd.log" & pids+=($!)
for p in $oport $eport $rport; do
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

# Version 1 on every frontend: the image through the edge, the tree by rsync
# (hard-linked copies: rsync replaces a changed file by a new one, so they
# stay independent).
for i in $(seq "$n"); do
  f=$work/f$i; mkdir -p "$f"
  printf 'source = "http://127.0.0.1:%s/stable.json"\ntrusted_keys = ["%s/k.pub"]\nstate_dir = "%s/state"\nlink = "%s/link"\ndrain_timeout = "1s"\nmachine_id = "f%s"\n' \
    "$eport" "$work" "$f" "$f" "$i" > "$f/cfg.toml"
  cp -al "$work/master" "$f/rsync-tree"
done
seq "$n" | xargs -P 4 -I{} "$bin/imgdeploy" -q -c "$work/f{}/cfg.toml" apply >/dev/null

# The update: the first directory (sorted) holding 0.8-1.4% of the bytes, rewritten.
du -B1 --apparent-size --max-depth=4 "$work/master" | sort -k2 > "$work/du.txt"
total=$(du -s -B1 --apparent-size "$work/master" | cut -f1)
d=$(awk -v t="$total" '$1 > t*0.008 && $1 < t*0.014 {print $2}' "$work/du.txt" | head -n 1 || true)
[[ -n $d ]] || { echo "error: no directory of $src holds 0.8-1.4% of its bytes; pick a larger tree" >&2; exit 1; }
echo "update: replacing $(find "$d" -type f | wc -l) files in ${d#"$work/master/"}" >&2
find "$d" -type f -print0 | while IFS= read -r -d '' file; do
  head -c "$(stat -c %s "$file")" /dev/urandom > "$file.new"; mv "$file.new" "$file"
done
build
sleep 6   # the edge caches the manifest for 5 s

: > "$work/origin.log"; : > "$work/edge.log"
t0=$(now)
seq "$n" | xargs -P 4 -I{} "$bin/imgdeploy" -q -c "$work/f{}/cfg.toml" apply >/dev/null
t1=$(now)
ib=$(awk '{s+=$3} END {print s+0}' "$work/origin.log")
eb=$(awk '{s+=$3} END {print s+0}' "$work/edge.log")
sample=$(find "$d" -type f | sort | head -n 1)
for i in $(seq "$n"); do
  cmp -s "$sample" "$work/f$i/link/${sample#"$work/master/"}" || { echo "error: frontend $i does not serve the update" >&2; exit 1; }
done

t2=$(now)
seq "$n" | xargs -P 4 -I{} sh -c "rsync -a --delete --stats rsync://127.0.0.1:$rport/tree/ $work/f{}/rsync-tree/ > $work/f{}/rsync.stats"
t3=$(now)
rb=$(cat "$work"/f*/rsync.stats | awk -F': ' '/Total bytes sent/ {gsub(",","",$2); s+=$2} /Total bytes received/ {gsub(",","",$2); r+=$2} END {print s+r}')
it=$(echo "$t1 - $t0" | bc -l); rt=$(echo "$t3 - $t2" | bc -l)
printf '%-34s %16s %10s\n' "" "origin bytes" "wall s"
printf '%-34s %16d %10.2f   (the edge served %d bytes)\n' "imgdeploy apply x$n via one edge" "$ib" "$it" "$eb"
printf '%-34s %16d %10.2f\n' "rsync -a --delete x$n from master" "$rb" "$rt"
awk -v ib="$ib" -v rb="$rb" -v it="$it" -v rt="$rt" -v n="$n" 'BEGIN {
  printf "ratio imgdeploy/rsync for %d frontends: origin bytes %.3fx  wall time %.2fx\n", n, ib/rb, it/rt }'
