#!/usr/bin/env bash
# CI step (scheduled, e.g. daily): re-sign each channel's current manifest with
# a fresh expiry (same image, same rollout, next serial). Short expiries limit
# how long a mirror can hold frontends on an old manifest; this keeps them
# from running out. Channels without a manifest yet are skipped.
#
#   IMGBUILD_KEY_PEM=... bash examples/ci/refresh.sh REPO CHANNEL...
set -euo pipefail
repo=$1
shift
imgbuild=${IMGBUILD:-imgbuild}
source "$(dirname "$0")/key.sh"
for channel in "$@"; do
  if [[ -e $repo/$channel.json ]]; then
    "$imgbuild" refresh --repo "$repo" --channel "$channel" --key "$key" --json
  else
    echo "refresh: channel $channel has no manifest yet; skipped" >&2
  fi
done
