# Sourced by publish.sh and promote.sh: puts the signing key in $key, from
# IMGBUILD_KEY_FILE or from the PEM in IMGBUILD_KEY_PEM (written to a 0600
# temp file removed on exit). The key is never echoed.
key=${IMGBUILD_KEY_FILE:-}
if [[ -z $key ]]; then
  if [[ -z ${IMGBUILD_KEY_PEM:-} ]]; then
    echo "error: set IMGBUILD_KEY_FILE (a path) or IMGBUILD_KEY_PEM (the PEM text) from a CI secret" >&2
    exit 1
  fi
  key=$(umask 077 && mktemp)
  trap 'rm -f "$key"' EXIT
  printf '%s\n' "$IMGBUILD_KEY_PEM" > "$key"
fi
