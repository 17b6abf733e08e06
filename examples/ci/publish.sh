#!/usr/bin/env bash
# CI step: pack the master tree and publish it to a channel, signing with a key
# from a CI secret (see key.sh). Prints imgbuild's JSON summary.
#
#   IMGBUILD_KEY_PEM=... bash examples/ci/publish.sh TREE REPO CHANNEL [VERSION]
set -euo pipefail
tree=$1 repo=$2 channel=$3 version=${4:-${CI_COMMIT_SHORT_SHA:-${GITHUB_SHA:-manual}}}
imgbuild=${IMGBUILD:-imgbuild}
source "$(dirname "$0")/key.sh"
"$imgbuild" build "$tree" --key "$key" --channel "$channel" --repo "$repo" --version "$version" --json
