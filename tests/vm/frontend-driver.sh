#!/bin/sh
# Runs inside the Debian frontend VM of tests/e2e/field.rs, started by
# fieldtest.service after every boot. It acts as an operator would
# (systemctl, imgdeploy, curl against the local Apache) and reports on
# /dev/ttyS1, which the host reads:
#   CHECK <name> ok | CHECK <name> FAIL <detail>
#   WANT <what>     the host publishes <what>, then creates /ready-<what> on the origin
#   DONE            all phases ran (the guest then powers off)
# The phase survives reboots in /var/lib/fieldtest/phase.
set -u
out=/dev/ttyS1
origin=http://10.0.2.100
state=/var/lib/fieldtest
mkdir -p "$state"
phase=$(cat "$state/phase" 2>/dev/null || echo 0)

say() { echo "$*" > "$out"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
ok() { say "CHECK $1 ok"; }
fail() { say "CHECK $1 FAIL $(echo "$2" | tr '\n' ' ' | cut -c1-600)"; }
# check NAME CMD...: the command must succeed.
check() { name=$1; shift; if o=$("$@" 2>&1); then ok "$name"; else fail "$name" "$o"; fi; }
# expect NAME WANT CMD...: the command's output must contain WANT.
expect() {
  name=$1; want=$2; shift 2
  o=$("$@" 2>&1)
  case "$o" in *"$want"*) ok "$name" ;; *) fail "$name" "wanted [$want], got [$o]" ;; esac
}
want() {
  say "WANT $1"
  i=0
  until curl -sf "$origin/ready-$1" >/dev/null; do
    i=$((i + 1)); [ $i -gt 300 ] && { fail "origin-published-$1" "no /ready-$1 after 60 s"; return 1; }
    sleep 0.2
  done
}
served() { curl -sf http://127.0.0.1/version.txt; }
# dm_create NAME UUID: a live device-mapper device (the "error" target, part
# of dm-mod) with nothing open, as a crash between creating a verity device
# and mounting it would leave one. Plain ioctls from perl: the guest has no dmsetup.
dm_create() {
  perl -e '
    my ($name, $uuid) = @ARGV;
    open(my $c, "+<", "/dev/mapper/control") or die "/dev/mapper/control: $!";
    sub call {
      my ($nr, $flags, $count, $payload) = @_;
      # The kernel takes a uuid only when creating (name and uuid together: EINVAL).
      my $u = $nr == 3 ? $uuid : "";
      my $buf = pack("L3 L L L l L L L Q a128 a129 a7", 4, 0, 0, 16384, 312, $count, 0, $flags, 0, 0, 0, $name, $u, "") . $payload;
      $buf .= "\0" x (16384 - length $buf);
      ioctl($c, 0xc138fd00 | $nr, $buf) or die "dm ioctl $nr: $!";
    }
    call(3, 1, 0, "");
    call(9, 1, 1, pack("Q Q l L a16", 0, 8, 0, 48, "error") . pack("a8", ""));
    call(6, 0, 0, "");
  ' "$1" "$2"
}
dm_names() { cat /sys/block/dm-*/dm/name 2>/dev/null; }
cgi() { curl -sf http://127.0.0.1/cgi-bin/version.cgi; }
# On failure, the unit's last journal lines say why (they reach the host's report).
apply() {
  systemctl start imgdeploy-apply.service 2>&1 && return 0
  journalctl -b --no-pager -o cat -u imgdeploy-apply.service | tail -n 4
  return 1
}
metric() { grep "^$1" /var/lib/prometheus/imgdeploy.prom; }
next_phase() { echo "$1" > "$state/phase"; sync; systemctl reboot; exit 0; }

# Requests the CGI and a static file until /run/stop-client exists; one line each.
client() {
  while [ ! -e /run/stop-client ]; do
    c=$(cgi) || c=FAIL
    s=$(served) || s=FAIL
    echo "$c|$s" >> /run/client.log
  done
}

# Waits (at most 60 s) until the client loop has logged N requests.
requests_past() {
  i=0
  while [ "$(wc -l < /run/client.log 2>/dev/null || echo 0)" -lt "$1" ] && [ $i -lt 300 ]; do
    sleep 0.2; i=$((i + 1))
  done
}

client_verdict() {
  n=$(wc -l < /run/client.log)
  [ "$n" -ge 10 ] || { echo "only $n requests"; return 1; }
  if grep -q FAIL /run/client.log; then echo "failed requests: $(grep -c FAIL /run/client.log) of $n"; return 1; fi
  # A CGI reads two files of its own tree: they must come from one version.
  bad=$(grep -v -E '^(v[12]) \1 www-data\|v[12]$' /run/client.log | head -3)
  [ -z "$bad" ] || { echo "mixed or foreign responses: $bad"; return 1; }
  grep -q '^v1 ' /run/client.log && grep -q '^v2 ' /run/client.log || { echo "the loop did not span the switch"; return 1; }
  echo "$n requests, 0 failed"
}

# Where the boot's time went (for the host's report).
say "BOOT $(systemd-analyze time 2>&1 | head -1) / slowest: $(systemd-analyze blame 2>/dev/null | head -3 | tr -s ' ' | tr '\n' ';')"
say "CHAIN $(systemd-analyze critical-chain --no-pager 2>&1 | tail -n +3 | tr -s ' ' | tr '\n' ';' | cut -c1-900)"
say "JOBS $(systemctl list-units --state=failed --no-legend --plain 2>&1 | tr -s ' ' | tr '\n' ';' | cut -c1-400)"

case "$phase" in
0)
  say "PHASE 0 (first boot) at $(uptime_s) s"
  expect packages-installed "install ok installed install ok installed" dpkg-query -W -f '${Status} ' imgdeploy imgbuild
  expect units-installed-not-enabled "disabled" systemctl is-enabled imgdeploy-mount.service
  expect timer-not-started "inactive" systemctl is-active imgdeploy-apply.timer
  check config-is-conffile grep -qx /etc/imgdeploy/imgdeploy.toml /var/lib/dpkg/info/imgdeploy.conffiles
  check man-page test -e /usr/share/man/man1/imgdeploy.1.gz
  # Regression: on a fresh Debian system nothing loaded the loop driver, and
  # the first apply failed; the package has systemd load loop and squashfs.
  check loop-driver-loaded-at-boot test -c /dev/loop-control
  check squashfs-driver-loaded-at-boot grep -qw squashfs /proc/filesystems
  systemctl enable imgdeploy-mount.service >/dev/null 2>&1
  want v1
  check origin-reachable curl -sf -o /dev/null "$origin/stable.json"
  check apply-v1 apply
  expect cgi-v1-as-www-data "v1 v1 www-data" cgi
  expect static-v1 "v1" served
  # The Debian kernel has dm-verity: every slot is mounted through it.
  check dm-verity-loaded grep -q '^dm_verity ' /proc/modules
  expect slot-mounted-through-verity '"integrity": "verity"' imgdeploy status --json
  expect mount-source-is-dm '/dev/dm-' imgdeploy status --json
  expect metrics-integrity-verity 'integrity="verity"} 1' metric imgdeploy_active_integrity

  want v2
  rm -f /run/stop-client /run/client.log
  client &
  # At least 5 requests before the switch and 5 after, however slow the
  # emulated machine is today (a fixed sleep gave 9 on a loaded host).
  requests_past 5
  check apply-v2-under-load apply
  requests_past $(($(wc -l < /run/client.log) + 5))
  touch /run/stop-client
  wait
  check switch-under-load client_verdict
  say "CLIENT $(client_verdict)"
  expect metrics-serial-2 "imgdeploy_active_serial{channel=\"stable\"} 2" metric imgdeploy_active_serial

  want bad
  if apply 2>/dev/null; then fail tampered-publish-refused "apply succeeded"; else ok tampered-publish-refused; fi
  expect still-v2-after-refusal "v2" served
  expect journal-names-refusal "sha256" journalctl -b --no-pager -u imgdeploy-apply.service
  expect metrics-failure "imgdeploy_last_apply_success{channel=\"stable\"} 0" metric imgdeploy_last_apply_success
  check rollback-after-refusal imgdeploy rollback
  expect rolled-back-to-v1 "v1" served

  want v4
  check apply-v4 apply
  expect serving-v4 "v4" served
  # The operator's timer; a drop-in makes its first run come soon after boot.
  check timer-enabled systemctl enable imgdeploy-apply.timer
  say "REBOOT at $(uptime_s) s"
  next_phase 1
  ;;
1)
  say "PHASE 1 (reboot) at $(uptime_s) s"
  expect mount-unit-ok "active" systemctl is-active imgdeploy-mount.service
  m=$(systemctl show -P ExecMainExitTimestampMonotonic imgdeploy-mount.service)
  a=$(systemctl show -P ExecMainStartTimestampMonotonic apache2.service)
  if [ "${m:-0}" -gt 0 ] && [ "${a:-0}" -gt "$m" ]; then ok mount-before-apache; else fail mount-before-apache "mount done at $m, apache started at $a"; fi
  expect v4-after-reboot "v4" served
  expect cgi-v4-after-reboot "v4 v4 www-data" cgi
  i=0
  until journalctl -b --no-pager -u imgdeploy-apply.service | grep -q "up to date"; do
    i=$((i + 1)); [ $i -gt 90 ] && break; sleep 1
  done
  expect timer-ran-apply "up to date" journalctl -b --no-pager -u imgdeploy-apply.service
  systemctl disable --now imgdeploy-apply.timer >/dev/null 2>&1
  target=$(readlink /webroot/cgi)
  slot=${target##*/}
  expect boot-mount-through-verity '"integrity": "verity"' imgdeploy status --json
  say "CORRUPT slot $slot at $(uptime_s) s"
  printf 'CORRUPTED-BY-THE-FIELD-TEST' | dd of="/var/lib/imgdeploy/slots/$slot/image.squashfs" bs=1 seek=8192 conv=notrunc 2>/dev/null
  next_phase 2
  ;;
2)
  say "PHASE 2 (reboot with the active image corrupted) at $(uptime_s) s"
  expect mount-unit-failed "failed" systemctl is-active imgdeploy-mount.service
  expect link-on-slot-a "/var/lib/imgdeploy/mnt/a" readlink /webroot/cgi
  expect serving-verified-v1 "v1" served
  expect cgi-v1-after-fallback "v1 v1 www-data" cgi
  expect journal-names-both-slots "serving slot a (serial 1) instead" journalctl -b --no-pager -u imgdeploy-mount.service
  expect status-records-fallback '"fallback_from": "b"' imgdeploy status --json
  expect metrics-fallback "imgdeploy_last_boot_fallback{channel=\"stable\"} 1" metric imgdeploy_last_boot_fallback
  check apply-repairs apply
  expect serving-v4-again "v4" served
  check verify-both-slots imgdeploy verify
  # One byte of a served file changes on disk under the mounted slot (as a
  # failing disk or a root process would do it): reads of that file fail
  # with EIO and never return other bytes; other files are still served.
  target=$(readlink /webroot/cgi)
  image=/var/lib/imgdeploy/slots/${target##*/}/image.squashfs
  check blob-readable-before sh -c 'runuser -u www-data -- cat /webroot/cgi/htdocs/blob.bin >/dev/null'
  at=$(grep -obUaF FIELDTEST-BLOB-MARKER "$image" | head -1 | cut -d: -f1)
  check blob-found-in-image test -n "$at"
  printf 'X' | dd of="$image" bs=1 seek=$((${at:-0} + 70000)) conv=notrunc 2>/dev/null
  sync; echo 3 > /proc/sys/vm/drop_caches
  expect corrupted-block-gives-eio "Input/output error" sh -c 'runuser -u www-data -- cat /webroot/cgi/htdocs/blob.bin 2>&1 >/dev/null'
  expect other-files-still-served "v4" served
  expect status-reports-corruption '"corrupted": true' imgdeploy status --json
  # The next apply notices dm-verity's record and repairs: the same serial
  # rebuilt in the other slot from local chunks plus the damaged one.
  check apply-repairs-corruption apply
  expect journal-names-damage "is damaged: dm-verity found corrupted blocks" journalctl -b --no-pager -u imgdeploy-apply.service
  check blob-readable-after-repair sh -c 'runuser -u www-data -- cat /webroot/cgi/htdocs/blob.bin >/dev/null'
  expect serving-v4-after-repair "v4" served
  check repair-fetched-one-chunk sh -c 'n=$(imgdeploy status --json | grep -o "\"bytes_downloaded\": [0-9]*" | grep -o "[0-9]*$"); echo "fetched $n"; [ "$n" -gt 0 ] && [ "$n" -le 262144 ]'
  expect repaired-slot-not-corrupted '"corrupted": false' imgdeploy status --json
  # A stale verity device of ours (same state directory tag as the live
  # one) is removed by the next apply; another program's device is not.
  prefix=$(cat /sys/block/dm-*/dm/uuid | grep -m1 '^IMGDEPLOY-VERITY-' | cut -d- -f1-3)
  check stale-device-created dm_create imgdeploy-a-9-stale "$prefix-imgdeploy-a-9-stale"
  check other-programs-device-created dm_create other-program-dev "OTHER-PROGRAM-dev"
  expect stale-device-present "imgdeploy-a-9-stale" dm_names
  check apply-after-crash apply
  check stale-device-removed sh -c '! cat /sys/block/dm-*/dm/name | grep -qx imgdeploy-a-9-stale'
  expect other-programs-device-kept "other-program-dev" dm_names
  check one-verity-device-per-mounted-slot sh -c 'n=$(cat /sys/block/dm-*/dm/uuid | grep -c "^IMGDEPLOY-VERITY-"); echo "$n devices"; [ "$n" -eq 1 ]'
  say "DONE at $(uptime_s) s"
  sync
  systemctl poweroff
  ;;
esac
