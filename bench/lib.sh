# Sourced by the scripts in bench/ (from the repository's root): what each of
# them needs around its measurement.

# Builds the packages named (`-p NAME ...`) in the profile the run asks for
# and sets `bin` to their directory. BENCH_PROFILE=dev (debug binaries,
# optimised hashing) is for smoke runs only.
bench_binaries() {
  bash scripts/setup-debian.sh
  cargo build --profile "${BENCH_PROFILE:-release}" --locked -q "$@"
  bin=$PWD/target/$([[ ${BENCH_PROFILE:-release} == dev ]] && echo debug || echo release)
}

# Makes the work directory `work` (/var/tmp/NAME.XXXXXX, mode 755: it holds
# the `link` imgdeploy checks) and, on exit, stops the servers in `pids`,
# unmounts whatever is mounted under it (deepest first) and removes it.
bench_workdir() {
  work=$(mktemp -d "/var/tmp/$1.XXXXXX")
  chmod 755 "$work"
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  umount_under "$work" 2>/dev/null || true
  rm -rf "$work"
}

# Unmounts DIR and everything mounted under it, deepest first; tries every
# one, and fails if one did not unmount.
umount_under() {
  local m rc=0
  while read -r m; do umount "$m" || rc=1; done < <(awk -v d="$1" 'index($2, d "/") == 1 || $2 == d {print $2}' /proc/mounts | sort -r)
  return $rc
}

# The smaller of two times in seconds; with the first empty (no run yet),
# the second: `best=$(smaller "$best" "$t")`.
smaller() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b + 0 < a + 0) ? b : a }'; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Serves ROOT over HTTP with nginx on 127.0.0.1, on a free port it puts in
# `port`, with HTTP_EXTRA (logging directives) in its http block. Its temp
# paths get a directory of their own (nginx chowns them to its worker user),
# never the work directory that holds `link`.
serve_static() {
  local root=$1 extra=$2 n=$work/nginx
  port=$(free_port)
  mkdir "$n"
  cat > "$n/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $n/nginx.pid; error_log $n/error.log;
events { worker_connections 256; }
http { $extra sendfile on;
  client_body_temp_path $n; proxy_temp_path $n; fastcgi_temp_path $n; uwsgi_temp_path $n; scgi_temp_path $n;
  server { listen 127.0.0.1:$port; root $root; } }
NGINX
  nginx -c "$n/nginx.conf" -p "$n" & pids+=($!)
}

# With BENCH_FS=xfs, btrfs or ext4, makes that filesystem on a loop device
# (a sparse file of SIZE, default 16G, in the work directory) and mounts it
# at $work/fs; `dest` is where the frontends' copies go: that mount, or
# $work itself (the work directory's own filesystem) when BENCH_FS is unset.
# On XFS and btrfs images are then built `--align`ed (BENCH_ALIGN=0 to
# not), so that unchanged files can share extents with the old image.
bench_fs() {
  dest=$work
  align=${BENCH_ALIGN:-0}
  [[ -n ${BENCH_FS:-} ]] || return 0
  align=${BENCH_ALIGN:-1}
  truncate -s "${1:-16G}" "$work/fs.img"
  case $BENCH_FS in
    xfs) mkfs.xfs -q -m reflink=1 "$work/fs.img" ;;
    btrfs) mkfs.btrfs -q "$work/fs.img" ;;
    # No extents to share: unchanged data is copied, as on the host's ext4.
    ext4) mkfs.ext4 -q "$work/fs.img"; align=${BENCH_ALIGN:-0} ;;
    *) echo "BENCH_FS=$BENCH_FS: use xfs, btrfs or ext4 (or leave it unset)" >&2; exit 2 ;;
  esac
  mkdir "$work/fs"
  mount -o loop "$work/fs.img" "$work/fs"
  dest=$work/fs
}

# fs_snapshot keeps a copy of bench_fs's filesystem as it is now (frozen
# while it is copied) and of where `link` points; fs_restore puts both back,
# unmounting what is mounted on it first (the caller mounts the slots
# again). So a change can be timed more than once from the same start.
fs_snapshot() {
  fsfreeze -f "$dest"
  cp --sparse=always "$work/fs.img" "$work/fs.snap" || { fsfreeze -u "$dest"; return 1; }
  fsfreeze -u "$dest"
  snap_link=$(readlink "$work/link" || true)
}

fs_restore() {
  umount_under "$dest"
  cp --sparse=always "$work/fs.snap" "$work/fs.img"
  mount -o loop "$work/fs.img" "$dest"
  if [[ -n $snap_link ]]; then ln -sfn "$snap_link" "$work/link"; fi
}

# The channel `bench` of the repository under $work/srv/repo, signed with
# $work/k.key and served by serve_static (ROOT $work/srv) on $port:
# `bench_deployer` writes $work/imgdeploy.toml, a frontend of it (state
# under $dest, see bench_fs, `link` under $work); `build` builds
# $work/master into it at BENCH_LEVEL (default 15), `--align`ed if bench_fs
# said so, and prints its JSON report; `field KEY` prints one field of
# the JSON on stdin.
bench_deployer() {
  cat > "$work/imgdeploy.toml" <<TOML
source = "http://127.0.0.1:$port/repo/bench.json"
trusted_keys = ["$work/k.pub"]
state_dir = "${dest:-$work}/state"
link = "$work/link"
drain_timeout = "1s"
TOML
}
build() {
  local a=(); [[ ${align:-0} == 1 ]] && a=(--align)
  "$bin/imgbuild" -q build "$work/master" --key "$work/k.key" --channel bench --repo "$work/srv/repo" --level "${BENCH_LEVEL:-15}" "${a[@]}" --json
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
