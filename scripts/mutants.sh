#!/usr/bin/env bash
# cargo-mutants on the pure modules: the manifest, signatures and trust,
# SHA-256 digests and checkpoints, chunk indexes, block maps and the block
# compressor, static deltas, the dm-verity hash tree, sources (local and
# HTTP, against a local test server), the multipart parser, the
# transport's credential files, the one-line error report, and rollout
# waves in common; the deployer's update decision, its read-back of the
# images it wrote and their check on every core, the device-mapper ioctl
# encoding and parsing, and the netboot /init's pure parts. Every mutant must be caught
# by the unit tests (cargo-mutants exits non-zero otherwise).
#
# All of them (about 790) take about an hour on 2 cores, far beyond CI's
# 45 minutes, so CI runs:
#   - every mutant of each module whose source is not recorded in
#     .ci/mutants-verified (a module's sha256 is recorded there by a run in
#     which every one of its mutants was caught), so no change to a module
#     lands with a surviving mutant; and
#   - every mutant of one of six groups of modules (120 to 200 mutants
#     each), picked by the commit, so unchanged modules are tried again
#     (a test weakened elsewhere cannot hide for long).
#
#   bash scripts/mutants.sh            what CI runs (MUTANTS_GROUP=0..5 picks the group)
#   bash scripts/mutants.sh --changed  only the modules not recorded; records them
#                                      when every mutant is caught (run before committing)
#   bash scripts/mutants.sh --all      every module; records them all
#   MUTANTS_JOBS=N                     parallel builds (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
verified=.ci/mutants-verified

# group  package  file  [regex of the mutants to leave out]
units=(
  "0 imgdeploy-common common/src/blockmap.rs"
  "1 imgdeploy-common common/src/location.rs"
  "4 imgdeploy-common common/src/manifest.rs"
  "1 imgdeploy-common common/src/trust.rs"
  "1 imgdeploy-common common/src/report.rs"
  "3 imgdeploy-common common/src/verity.rs"
  "3 imgdeploy-common common/src/chunk.rs"
  # SHA-256 digests, and the resumable SHA-256 behind the checkpoints.
  "1 imgdeploy-common common/src/digest.rs"
  "1 imgdeploy-common common/src/rollout.rs"
  "1 imgdeploy-common common/src/compress.rs"
  "4 imgdeploy-common common/src/transport.rs"
  "3 imgdeploy-common common/src/multipart.rs"
  "3 imgdeploy-common common/src/sign.rs"
  # The static delta format and applier. Left out: copy_range_with's loop
  # condition with the bound included (copying 0 bytes returns 0, which
  # ends the loop the same way: an equivalent mutant).
  "2 imgdeploy-common common/src/sdelta.rs sdelta\.rs:.*replace > with >= in copy_range_with"
  "5 imgdeploy-deployer deployer/src/decide.rs"
  # Reading an image back to check it: the cached and the direct runs.
  # Left out: the mapping's munmap (a leak only), and `run` answering
  # "cached, 1 byte" (readback's own tests fail at once, but
  # parallel_check's then read megabytes a byte at a time, past the
  # timeout).
  "0 imgdeploy-deployer deployer/src/readback.rs readback\.rs:.*replace (<impl Drop for Mapping>::drop|ReadBack::run -> Option<\(bool, usize\)> with Some\(\(true, 1\)\))"
  # Checking an image's pieces between SHA-256 checkpoints on every core.
  "0 imgdeploy-deployer deployer/src/parallel_check.rs"
  # The netboot /init: its command line, the DHCP lease, the resolver files,
  # the resumable download and the memory check; what needs a booted
  # machine (bring_up, fetch_current, fetch_from) is the qemu tests' job.
  "5 imgdeploy-deployer deployer/src/boot/params.rs"
  "5 imgdeploy-deployer deployer/src/boot/network.rs network\.rs:.*(in|replace) (dhcp_event|handle_dhcp_event|lease_path|busybox|interfaces|bring_up|dhcp|configure)\b"
  "4 imgdeploy-deployer deployer/src/boot/download.rs download\.rs:.*(fetch_current|fetch_from)"
  # The ioctl encoding and reply parsers; the ioctls themselves (Control::)
  # run in the field VM test.
  "5 imgdeploy-deployer deployer/src/devmapper.rs devmapper\.rs:.*Control::"
)
groups=6

mode=ci
case ${1:-} in
  --all) mode=all ;;
  --changed) mode=changed ;;
  "") ;;
  *) echo "usage: bash scripts/mutants.sh [--changed|--all]" >&2; exit 2 ;;
esac
group=${MUTANTS_GROUP:-}
if [[ -z $group ]]; then
  head=$(git rev-parse HEAD 2>/dev/null || date +%j | sha256sum)
  group=$((16#${head:0:1} % groups))
fi

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "installing cargo-mutants from crates.io" >&2
  cargo install --locked cargo-mutants@27.1.0 >&2
fi

# cargo-mutants makes target/mutants but not its parent (a fresh clone has no target/).
mkdir -p target
args=(--no-shuffle --jobs "${MUTANTS_JOBS:-2}" --profile mutants --output target/mutants)
declare -A packages=()
picked=() changed=()
for unit in "${units[@]}"; do
  read -r g package file drop <<< "$unit"
  sum=$(sha256sum "$file")
  new=false
  grep -qxF "$sum" "$verified" 2>/dev/null || new=true
  $new && changed+=("$file")
  if [[ $mode == all ]] || $new || [[ $mode == ci && $g == "$group" ]]; then
    picked+=("$file")
    packages[$package]=1
    args+=(-f "$file")
    [[ -n $drop ]] && args+=(--exclude-re "$drop")
  fi
done
for p in "${!packages[@]}"; do args+=(-p "$p"); done

case $mode in
  all) echo "mutants: every module" >&2 ;;
  changed) echo "mutants: the modules not recorded in $verified: ${changed[*]:-none}" >&2 ;;
  ci) echo "mutants: group $group of $groups, and the modules not recorded in $verified: ${changed[*]:-none}" >&2 ;;
esac
if ((${#picked[@]} == 0)); then
  echo "mutants: nothing to run" >&2
  exit 0
fi
echo "mutants: ${picked[*]}" >&2
cargo mutants "${args[@]}"

# Every mutant of the picked modules was caught: record their sources.
if [[ $mode != ci ]]; then
  tmp=$(mktemp "$verified.XXXXXX")
  {
    grep -v '^#' "$verified" 2>/dev/null | grep -vF -f <(printf '  %s\n' "${picked[@]}") || true
    for file in "${picked[@]}"; do sha256sum "$file"; done
  } | sort -k2 > "$tmp.body"
  { echo "# sha256 of each module at a run of scripts/mutants.sh that caught every mutant"; cat "$tmp.body"; } > "$tmp"
  rm -f "$tmp.body"
  mv "$tmp" "$verified"
  echo "mutants: every mutant caught; $verified records ${picked[*]}" >&2
fi
