#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 60) over its corpus in
# fuzz/corpus/. cargo-fuzz needs nightly compiler features; RUSTC_BOOTSTRAP=1
# lets the stable toolchain (the only one available here) provide them.
#
#   bash scripts/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
export RUSTC_BOOTSTRAP=1
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(manifest keys config chunk_index multipart block_map static_delta)
  # Every target in one cargo run, which builds them in parallel; each run
  # below then starts at once.
  cargo fuzz build
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  # New inputs go to a scratch corpus so the committed seeds stay small.
  scratch=$(mktemp -d)
  out=$(cargo fuzz run "$t" "$scratch" "corpus/$t" -- -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=2048 2>&1) || { echo "$out" | tail -40; echo "fuzz target $t failed" >&2; exit 1; }
  echo "fuzz $t: $(echo "$out" | grep -E '^Done' | tail -1)"
  rm -rf "$scratch"
done
