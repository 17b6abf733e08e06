#!/usr/bin/env bash
# The whole cycle on the bundled example tree, end to end, on this machine:
# build and sign an image, serve the repository with nginx on 127.0.0.1,
# apply it to a temp state dir and link, publish a second version, apply it,
# show status, roll back. Installs what it needs (Debian, as root).
#
#   sudo bash examples/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
cargo build --release --locked -q
bin=$PWD/target/release
work=$(mktemp -d /tmp/imgdeploy-demo.XXXXXX)
nginx_pid=
cleanup() {
  [[ -n $nginx_pid ]] && kill "$nginx_pid" 2>/dev/null || true
  for m in "$work"/state/mnt/a "$work"/state/mnt/b; do umount "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1. a signing key (CI keeps the .key secret; frontends get the .pub)"
"$bin/imgbuild" keygen --out "$work/ci"

step "2. build and publish version 1 of examples/tree"
cp -a examples/tree "$work/tree"
"$bin/imgbuild" build "$work/tree" --key "$work/ci.key" --channel stable --repo "$work/repo" --version demo-1
"$bin/imgbuild" verify "$work/repo/stable.json" --pub "$work/ci.pub"

step "3. serve the repository with nginx on 127.0.0.1"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx-error.log;
events { worker_connections 64; }
http { access_log $work/access.log; client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 127.0.0.1:$port; root $work/repo; } }
NGINX
nginx -c "$work/nginx.conf" -p "$work" & nginx_pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
echo "repository at http://127.0.0.1:$port/" >&2

step "4. a frontend's config"
cat > "$work/imgdeploy.toml" <<TOML
source = "http://127.0.0.1:$port/stable.json"
trusted_keys = ["$work/ci.pub"]
state_dir = "$work/state"
link = "$work/webroot/cgi"
drain_timeout = "10s"
health_check = "test -x \"\$IMGDEPLOY_MOUNT/bin/hello.cgi\" && test -d"
TOML
cat "$work/imgdeploy.toml" >&2
export IMGDEPLOY_CONFIG=$work/imgdeploy.toml

step "5. apply version 1"
"$bin/imgdeploy" apply
"$work/webroot/cgi/bin/hello.cgi"

step "6. publish version 2 and apply it (atomic switch, old slot drained)"
printf 'version 2\n' > "$work/tree/etc/image-version"
sed -i 's/hello from the image/hello from version 2 of the image/' "$work/tree/bin/hello.cgi"
"$bin/imgbuild" build "$work/tree" --key "$work/ci.key" --channel stable --repo "$work/repo" --version demo-2
"$bin/imgdeploy" apply
"$work/webroot/cgi/bin/hello.cgi"
"$bin/imgdeploy" apply   # idempotent

step "7. status"
"$bin/imgdeploy" status

step "8. a local edit is impossible: the tree is a read-only mount"
touch "$work/webroot/cgi/etc/local-edit" 2>&1 | sed 's/^/  /' >&2 || true

step "9. roll back, and verify both slots"
"$bin/imgdeploy" rollback
cat "$work/webroot/cgi/etc/image-version"
"$bin/imgdeploy" verify
step "done"
