#!/usr/bin/env bash
# cargo-mutants on the pure modules: the manifest, signatures and trust,
# chunk indexes, block maps and the block compressor, sources (local and HTTP, against a local test server), the
# multipart parser, the transport's credential files, the one-line error
# report, and rollout waves in common; the deployer's update decision and
# the netboot /init's pure parts. Every mutant
# must be caught by the unit tests (cargo-mutants exits non-zero otherwise).
# Cheap enough for CI: the mutants build incrementally and run only the
# mutated package's unit tests (about 4 s each).
#
#   bash scripts/mutants.sh            (MUTANTS_JOBS=N to change parallelism)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo mutants --version >/dev/null 2>&1; then
  echo "installing cargo-mutants from crates.io" >&2
  cargo install --locked cargo-mutants@27.1.0 >&2
fi
args=(--no-shuffle --jobs "${MUTANTS_JOBS:-2}" --profile mutants --output target/mutants)
cargo mutants "${args[@]}" -p imgdeploy-common \
  -f common/src/manifest.rs -f common/src/sign.rs -f common/src/trust.rs \
  -f common/src/chunk.rs -f common/src/location.rs -f common/src/rollout.rs \
  -f common/src/multipart.rs -f common/src/transport.rs -f common/src/report.rs \
  -f common/src/blockmap.rs -f common/src/compress.rs
# The deployer: the update decision, and the netboot /init's pure parts (its
# command line, the DHCP lease, the resolver files, the resumable download
# and the memory check); what needs a booted machine is the qemu tests' job.
cargo mutants "${args[@]}" -p imgdeploy-deployer -f deployer/src/decide.rs \
  -f deployer/src/boot/params.rs -f deployer/src/boot/network.rs -f deployer/src/boot/download.rs \
  --re 'decide\.rs|params\.rs|network\.rs:.*(lease_from_env|valid_interface|write_resolver)|download\.rs' \
  --exclude-re 'fetch_current|fetch_from|bring_up'

