#!/usr/bin/env bash
# Uploads a repository to an object store with rclone or the aws CLI: immutable
# images, indexes, block maps and sigs/ (signatures named by the manifest they sign) first,
# then the channel signatures, then the manifests last, so no frontend ever
# sees a manifest whose image or signature is not there yet.
#
#   bash examples/ci/upload.sh REPO DEST     (DEST: s3://bucket/path or an rclone remote:path)
set -euo pipefail
repo=$1 dest=$2
if [[ $dest == s3://* ]]; then
  aws s3 sync "$repo/images" "$dest/images" --cache-control "public,max-age=31536000,immutable"
  aws s3 sync "$repo/indexes" "$dest/indexes" --cache-control "public,max-age=31536000,immutable"
  aws s3 sync "$repo/maps" "$dest/maps" --cache-control "public,max-age=31536000,immutable"
  aws s3 sync "$repo/sigs" "$dest/sigs" --cache-control "public,max-age=31536000,immutable"
  aws s3 sync "$repo" "$dest" --exclude "*" --include "*.json.sig" --cache-control "public,max-age=30"
  aws s3 sync "$repo" "$dest" --exclude "*" --include "*.json" --cache-control "public,max-age=30"
else
  rclone copy "$repo/images" "$dest/images"
  rclone copy "$repo/indexes" "$dest/indexes"
  rclone copy "$repo/maps" "$dest/maps"
  rclone copy "$repo/sigs" "$dest/sigs"
  rclone copy "$repo" "$dest" --include "*.json.sig"
  rclone copy "$repo" "$dest" --include "*.json"
fi
