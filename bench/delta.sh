#!/usr/bin/env bash
# Delta updates against the peers, in one run: for three changes of a >= 1 GB
# tree, the bytes each tool moves over loopback and its wall time.
#
#   (a) one file of a few KB edited
#   (b) one package's worth of files replaced (~1% of the bytes)
#   (c) ~10% of the files changed
#
# Tools: `imgdeploy apply` (the static delta CI published, else the chunk
# delta; nginx), rsync -a --delete over an rsync
# daemon (--stats), casync (make of the image into a chunk store served by
# nginx, extract --seed=OLD), zsync (zsyncmake + zsync -i OLD), and a full
# image download. HTTP bytes come from nginx's access log. Also printed: the
# build's time and how much of it went into the static deltas, and
# imgdeploy's client CPU seconds and peak RSS.
#
#   bash bench/delta.sh [SRC...]   default: /usr/share /usr/lib/x86_64-linux-gnu
#   BENCH_LEVEL=3 bash bench/delta.sh   images built at `--level 3` (default 15)
#   BENCH_FS=xfs bash bench/delta.sh    every tool writes to XFS on a loop device
#                                       (reflinks; images built --align); also
#                                       btrfs, or ext4 (no reflinks)
#   BENCH_RUNS=N   rsync and imgdeploy each time a change N times from the same
#                  start (the loop filesystem restored in between; the best
#                  time counts); default 3 with BENCH_FS, else 1 (and only 1)
set -euo pipefail
cd "$(dirname "$0")/.."
srcs=("$@"); ((${#srcs[@]})) || srcs=(/usr/share /usr/lib/x86_64-linux-gnu)
source bench/lib.sh
bench_binaries -p imgdeploy-builder -p imgdeploy-deployer
bench_workdir imgdelta
bench_fs
runs=${BENCH_RUNS:-$([[ -n ${BENCH_FS:-} ]] && echo 3 || echo 1)}
if ((runs > 1)) && [[ -z ${BENCH_FS:-} ]]; then
  echo "BENCH_RUNS=$runs needs BENCH_FS: the runs start again from a copy of its loop filesystem" >&2
  exit 2
fi
now() { date +%s.%N; }

mkdir -p "$work/master" "$work/srv"
for s in "${srcs[@]}"; do cp -a "$s" "$work/master/"; done
echo "tree: ${srcs[*]}: $(du -sh --apparent-size "$work/master" | cut -f1), $(find "$work/master" -type f | wc -l) files; $(nproc) cores; zstd level ${BENCH_LEVEL:-15}; writing to ${BENCH_FS:-$(stat -f -c %T "$dest")}$([[ $align == 1 ]] && echo ", images aligned"); best of $runs run(s)" >&2
"$bin/imgbuild" -q keygen --out "$work/k" >/dev/null

# nginx serving the image repository, the casync store and the zsync files.
serve_static "$work/srv" "log_format f '\$request_uri \$status \$body_bytes_sent'; access_log $work/access.log f;"
# rsync daemon serving the master tree.
rport=$(free_port)
printf 'use chroot = no\nnumeric ids = yes\n[tree]\npath = %s/master\nread only = yes\nuid = root\ngid = root\n' "$work" > "$work/rsyncd.conf"
rsync --daemon --no-detach --port="$rport" --address=127.0.0.1 --config="$work/rsyncd.conf" & pids+=($!)
sleep 1
http_bytes() { awk '{s+=$3} END {print s+0}' "$work/access.log"; }
reset_log() { : > "$work/access.log"; }

# Runs a command; its last stderr line is its wall time (seconds, first),
# CPU time and peak RSS. The wall is timed here, around the command alone:
# timed from outside it would include Python's start, 0.1 to 0.2 s, which
# the peers do not pay.
measured() {
  python3 -c 'import resource, subprocess, sys, time
t0 = time.monotonic()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.monotonic() - t0
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print("%.4f s wall, client CPU %.2f s (user %.2f, sys %.2f), peak RSS %.1f MiB" % (wall, u.ru_utime + u.ru_stime, u.ru_utime, u.ru_stime, u.ru_maxrss / 1024), file=sys.stderr)
sys.exit(rc)' "$@"
}
deltas_summary() {
  python3 -c 'import json, sys
ds = json.load(sys.stdin)["deltas"]
print(", ".join("%d B (%d copied, %d patched in %d blocks, %d literal)" % (d["size"], d["copied"], d["patched"], d["blocks_patched"], d["literal"]) for d in ds) or "none")'
}
bench_deployer
# On XFS or btrfs: how much of the image imgdeploy just installed shares its
# extents with another file (the old image), from filefrag's "shared" flag.
shared() {
  [[ ${BENCH_FS:-} == xfs || ${BENCH_FS:-} == btrfs ]] || return 0
  local img; img=$(ls -t "$dest"/state/slots/*/image.squashfs | head -n 1)
  filefrag -v "$img" | awk -F: '$1 ~ /^ *[0-9]+$/ {n = $4 + 0; all += n; if ($0 ~ /shared/) s += n}
    END {printf ", %.1f%% of the new image shares extents with the old", all ? 100 * s / all : 0}'
}

# Version 1 everywhere.
v1=$(build); img1=$(echo "$v1" | field '["image"]')
"$bin/imgdeploy" -q -c "$work/imgdeploy.toml" apply >/dev/null
cp -a "$work/master" "$dest/rsync-copy"
cp "$img1" "$dest/old.img"

change() {
  case $1 in
    a) f=$(find "$work/master" -type f -size -8k -size +2k | sort | awk '{last=$0} NR==500 {pick=$0} END {print (pick != "" ? pick : last)}'); printf '# edited\n' >> "$f" ;;
    b) # The first directory (sorted) holding 0.8-1.4% of the bytes: "one package".
       du -B1 --apparent-size --max-depth=4 "$work/master" | sort -k2 > "$work/du.txt"
       total=$(du -s -B1 --apparent-size "$work/master" | cut -f1)
       d=$(awk -v t="$total" '$1 > t*0.008 && $1 < t*0.014 {print $2}' "$work/du.txt" | head -n 1 || true)
       [[ -n $d ]] || { echo "no package-sized directory found" >&2; exit 1; }
       echo "(b) replacing $(find "$d" -type f | wc -l) files in ${d#"$work/master/"}" >&2
       find "$d" -type f -print0 | while IFS= read -r -d '' f; do head -c "$(stat -c %s "$f")" /dev/urandom > "$f.new"; mv "$f.new" "$f"; done ;;
    c) echo "(c) changing every 10th file" >&2
       find "$work/master" -type f | sort | awk 'NR % 10 == 0' | while read -r f; do
         s=$(stat -c %s "$f"); [ "$s" -gt 0 ] || continue
         head -c $((s < 4096 ? s : 4096)) /dev/urandom | dd of="$f" bs=1 seek=$((s / 3)) conv=notrunc status=none; done ;;
  esac
}

summary=()
printf '\n%-4s %-22s %14s %9s %9s\n' chg tool "bytes" "vs rsync" "wall s"
for s in a b c; do
  change "$s"
  tb0=$(now); v=$(build); tb1=$(now); img=$(echo "$v" | field '["image"]'); size=$(echo "$v" | field '["size"]')
  echo "($s) imgbuild build: $(echo "$tb1 - $tb0" | bc -l | xargs printf '%.1f') s, of which static deltas $(echo "$v" | field '["deltas_ms"]') ms: $(echo "$v" | deltas_summary)" >&2
  # casync store and zsync control file for the new image (server-side preparation, not timed).
  rm -rf "$work/srv/store.castr"; casync make --store="$work/srv/store.castr" "$work/srv/image.caibx" "$img" >/dev/null
  cp "$img" "$work/srv/new.img"; (cd "$work/srv" && zsyncmake -u new.img -o new.img.zsync new.img >/dev/null 2>&1)

  # rsync, the status quo, then imgdeploy, `runs` times from the same start
  # (the frontend's filesystem restored in between); the best time counts.
  # Each tool starts with nothing left to write back: the preparation above
  # leaves about a GB dirty, which would slow whoever syncs first.
  if ((runs > 1)); then rm -f "$dest/casync.img" "$dest/zsync.img"; fs_snapshot; fi
  rt= it=
  for ((run = 1; run <= runs; run++)); do
    if ((run > 1)); then fs_restore; "$bin/imgdeploy" -q -c "$work/imgdeploy.toml" mount >/dev/null; fi
    sync; t0=$(now); out=$(rsync -a --delete --stats "rsync://127.0.0.1:$rport/tree/" "$dest/rsync-copy/"); t1=$(now)
    rb=$(echo "$out" | awk -F': ' '/Total bytes sent/ {gsub(",","",$2); s=$2} /Total bytes received/ {gsub(",","",$2); r=$2} END {print s+r}')
    r_t=$(echo "$t1 - $t0" | bc -l)
    sync; reset_log
    usage=$(measured "$bin/imgdeploy" -q -c "$work/imgdeploy.toml" apply --json 2>&1 > "$work/apply.json" | tail -1)
    ib=$(http_bytes); i_t=${usage%% s wall*}; usage=${usage#*wall, }
    mode=$(field '["download"]["mode"]' < "$work/apply.json"); patched=$(field '["download"]["patched"]' < "$work/apply.json")
    echo "($s) run $run of $runs: rsync $(printf '%.2f' "$r_t") s; imgdeploy $(printf '%.2f' "$i_t") s, $mode, $patched bytes patched$(shared), $usage" >&2
    rt=$(smaller "$rt" "$r_t"); it=$(smaller "$it" "$i_t")
  done
  # casync.
  sync; reset_log; rm -f "$dest/casync.img"; t0=$(now)
  casync extract --seed="$dest/old.img" --store="http://127.0.0.1:$port/store.castr" "http://127.0.0.1:$port/image.caibx" "$dest/casync.img" >/dev/null 2>&1; t1=$(now)
  cb=$(http_bytes); ct=$(echo "$t1 - $t0" | bc -l); cmp -s "$dest/casync.img" "$img" || echo "warning: casync result differs" >&2
  # zsync.
  sync; reset_log; rm -f "$dest/zsync.img"; t0=$(now)
  (cd "$dest" && zsync -q -i "$dest/old.img" -o "$dest/zsync.img" "http://127.0.0.1:$port/new.img.zsync" >/dev/null 2>&1); t1=$(now)
  zb=$(http_bytes); zt=$(echo "$t1 - $t0" | bc -l); cmp -s "$dest/zsync.img" "$img" || echo "warning: zsync result differs" >&2
  # full download.
  reset_log; t0=$(now); curl -sS -o /dev/null "http://127.0.0.1:$port/repo/${img#"$work/srv/repo/"}"; t1=$(now)
  fb=$(http_bytes); ft=$(echo "$t1 - $t0" | bc -l)
  for row in "imgdeploy-delta $ib $it" "rsync-daemon $rb $rt" "casync $cb $ct" "zsync $zb $zt" "full-download $fb $ft"; do
    set -- $row
    printf '%-4s %-22s %14d %8.2fx %9.2f\n' "$s" "$1" "$2" "$(echo "$2 / $rb" | bc -l)" "$3"
  done
  summary+=("($s) bytes $(echo "$ib / $rb" | bc -l | xargs printf '%.2f')x time $(echo "$it / $rt" | bc -l | xargs printf '%.2f')x")
  cp "$img" "$dest/old.img"
done
echo "ratio imgdeploy/rsync: ${summary[*]}"
