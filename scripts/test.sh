#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests
# (real kernel mounts, real nginx). Run as root; under CI=true no privileged
# test may skip.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-debian.sh

cargo fmt --all -- --check
cargo build --workspace --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests run the binaries built above. As root they run in a
# private mount namespace: every mount they make is invisible to the host and
# disappears with the namespace, whatever happens to the tests.
ns=()
if [[ $(id -u) -eq 0 ]] && unshare --mount --propagation private true 2>/dev/null; then
  ns=(unshare --mount --propagation private)
fi
"${ns[@]}" cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
