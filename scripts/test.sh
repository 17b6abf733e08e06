#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests
# (real kernel mounts, real nginx). Run as root; under CI=true no privileged
# test may skip.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage says when it starts, so a slow CI run shows where its time went.
stage() { echo "== $1 (at $SECONDS s)" >&2; }
stage "setup"
bash scripts/setup-debian.sh

stage "fmt, build, clippy"
cargo fmt --all -- --check
cargo build --workspace --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
# The static /init that the netboot tests pack (the tests would build it otherwise).
IMGDEPLOY_NETBOOT_INIT=$(bash scripts/build-netboot-init.sh)
export IMGDEPLOY_NETBOOT_INIT
# The end-to-end tests run the binaries built above. As root they run in a
# private mount namespace: every mount they make is invisible to the host and
# disappears with the namespace, whatever happens to the tests.
ns=()
if [[ $(id -u) -eq 0 ]] && unshare --mount --propagation private true 2>/dev/null; then
  ns=(unshare --mount --propagation private)
fi
stage "unit and end-to-end tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"${ns[@]}" cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log"

# Fuzz the parsers of untrusted input (manifest, keys and signatures, config
# and state, chunk index, multipart answers, block maps) for FUZZ_SECONDS each
# (20 here, to keep CI under 45 minutes; a longer campaign is
# `FUZZ_SECONDS=600 bash scripts/fuzz.sh`).
stage "fuzzing"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz.sh

# Mutation testing of the pure modules: every mutant must be caught.
stage "cargo-mutants"
bash scripts/mutants.sh

# Every benchmark once at a tiny size: it must run and print its ratio line.
stage "benchmarks at a tiny size"
bash scripts/bench-smoke.sh
stage "done"

# One closing line for every test run above (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
