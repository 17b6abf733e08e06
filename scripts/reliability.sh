#!/usr/bin/env bash
# Runs the reliability tests (faults, bad content, crashes, disk, load, keys)
# and power loss, with their figures printed, and prints the lines RELIABILITY.md quotes.
#
#   sudo bash scripts/reliability.sh            (IMGDEPLOY_CRASH_KILLS=1000 for a longer crash loop)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
cargo build --workspace --locked -q

unshare --mount --propagation private cargo test --locked -q -p imgdeploy-tests --test e2e -- \
  reliability:: powerloss:: deployer:: delta:: fleet::privileged_fifty --nocapture --test-threads=1 2>&1 \
  | grep -E '^(RELIABILITY|[0-9]+ (kills|switches|deployers)|test result)'
