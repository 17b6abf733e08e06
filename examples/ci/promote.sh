#!/usr/bin/env bash
# CI step (manual): sign FROM's exact image for channel TO, optionally as a staged rollout.
#
#   IMGBUILD_KEY_PEM=... bash examples/ci/promote.sh REPO FROM TO [PERCENT]
set -euo pipefail
repo=$1 from=$2 to=$3 percent=${4:-}
imgbuild=${IMGBUILD:-imgbuild}
source "$(dirname "$0")/key.sh"
args=(promote --repo "$repo" --from "$from" --to "$to" --key "$key" --json)
[[ -n $percent ]] && args+=(--percent "$percent")
"$imgbuild" "${args[@]}"
