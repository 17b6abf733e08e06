#!/usr/bin/env bash
# CI step: pack the master tree and publish it to a channel, signing with a key
# taken from a CI secret. The key comes from a file (IMGBUILD_KEY_FILE) or from
# an environment variable holding the PEM (IMGBUILD_KEY_PEM); it is written to
# a 0600 temp file and never printed.
#
#   IMGBUILD_KEY_PEM=... bash examples/ci/publish.sh TREE REPO CHANNEL [VERSION]
set -euo pipefail
tree=$1 repo=$2 channel=$3 version=${4:-${CI_COMMIT_SHORT_SHA:-${GITHUB_SHA:-manual}}}
imgbuild=${IMGBUILD:-imgbuild}
key=${IMGBUILD_KEY_FILE:-}
if [[ -z $key ]]; then
  [[ -n ${IMGBUILD_KEY_PEM:-} ]] || { echo "error: set IMGBUILD_KEY_FILE or IMGBUILD_KEY_PEM" >&2; exit 1; }
  key=$(mktemp); trap 'rm -f "$key"' EXIT
  chmod 600 "$key"
  printf '%s\n' "$IMGBUILD_KEY_PEM" > "$key"
fi
"$imgbuild" build "$tree" --key "$key" --channel "$channel" --repo "$repo" --version "$version" --json
