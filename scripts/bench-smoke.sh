#!/usr/bin/env bash
# Runs every benchmark under bench/ once at a tiny size (seconds each), so a
# benchmark that breaks fails CI the day it breaks. Each must exit 0 and print
# its ratio line against its peer; no timing is asserted (that is what the
# full-size runs in BENCHMARKS.md are for). Debug binaries with the
# workspace's optimised hashing and zstd (BENCH_PROFILE=dev) keep it quick.
#
#   bash scripts/bench-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_PROFILE=dev
# zstd level 3 instead of 15: the smoke run checks that a benchmark works, not its figures.
export BENCH_LEVEL=3
# One run of each tool: the smoke run checks the script, not the figures.
export BENCH_RUNS=1
# A small tree that every Debian machine has, with package-sized directories.
small=/usr/share/doc
runs=(
  "build.sh $small"
  "deploy.sh 8"
  "delta.sh $small"
  "BENCH_FS=xfs BENCH_RUNS=2 delta.sh $small"
  "publish.sh $small"
  "memory.sh 64"
  "layout.sh $small"
  "fleet.sh 3 $small"
  "verity.sh /usr/share/doc/dpkg"
)
for r in "${runs[@]}"; do
  read -r -a cmd <<< "$r"
  # Leading NAME=VALUE words are the run's environment.
  vars=()
  while [[ ${cmd[0]} == *=* ]]; do vars+=("${cmd[0]}"); cmd=("${cmd[@]:1}"); done
  start=$SECONDS
  if ! out=$(env "${vars[@]}" bash "bench/${cmd[0]}" "${cmd[@]:1}" 2>&1); then
    echo "$out" | tail -30
    echo "error: bench/$r failed" >&2
    exit 1
  fi
  if ! ratio=$(echo "$out" | grep -m1 -E '(^|: )ratio '); then
    echo "$out" | tail -30
    echo "error: bench/$r printed no ratio line" >&2
    exit 1
  fi
  echo "bench/$r ($((SECONDS - start)) s): $ratio"
done
